"""``/_warden/antispam/v1`` on a gateway process with a filter worker process: the
worker's antispam checks and evaluations are wired in, every decision is counted, and a
``check_event_for_spam`` refusal is stored and readable through the admin API."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Callable

import httpx
import pytest
from unpaddedbase64 import encode_base64

from tests.service_processes import ServiceProcess
from warden.policy.harms import HARMS_FIELD, SPAM

ADMIN = {"Authorization": "Bearer k"}


@pytest.mark.slow
async def test_callbacks_on_a_gateway_and_worker_process(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    worker = spawn_service("filter-worker")
    gateway = spawn_service("gateway", PS_API_KEY="k")
    await asyncio.to_thread(worker.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    assert gateway.api_url is not None
    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as http:
        r = await http.post("/api/v1/communities/new", json={"name": "Homeserver"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        community = r.json()["community_id"]
        r = await http.patch(
            f"/api/v1/communities/{community}",
            json={"config": {"keyword_filter_keywords": ["buy now"]}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        r = await http.post(f"/api/v1/communities/{community}/rotate_access_token", headers=ADMIN)
        token = r.json()["new_access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        r = await http.post("/_warden/antispam/v1/ping", json={"id": "x1"}, headers=auth)
        assert r.status_code == 200 and r.json() == {"id": "x1", "status": "ok"}, r.text

        event_id = "$" + encode_base64(os.urandom(32), urlsafe=True)
        event = {
            "type": "m.room.message",
            "sender": "@alice:hs.example",
            "room_id": "!" + encode_base64(os.urandom(18), urlsafe=True),
            "event_id": event_id,
            "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": "buy now!"},
        }
        r = await http.post(
            "/_warden/antispam/v1/check_event_for_spam", json={"event": event}, headers=auth
        )
        assert r.status_code == 403, r.text
        assert r.json()["errcode"] == "M_FORBIDDEN"
        assert r.json()["harms"] == r.json()[HARMS_FIELD] == [SPAM]

        join = {"user": "@bob:hs.example", "room": event["room_id"], "is_invited": False}
        r = await http.post("/_warden/antispam/v1/user_may_join_room", json=join, headers=auth)
        assert r.status_code == 200, r.text

        key = urllib.parse.quote(f"antispam:{community}:{event_id}", safe="")
        r = await http.get(f"/api/v1/events/{key}", headers=ADMIN)
        assert r.status_code == 200, r.text
        stored = r.json()
        assert stored["harms"] == [SPAM] and stored["origin"] == "hs.example"
        assert {"name": "keyword", "class": "prohibited"}.items() <= {
            **next(f for f in stored["filters"] if f["name"] == "keyword")
        }.items()

    metrics = httpx.get(f"{gateway.metrics_url}/metrics").text
    assert (
        'warden_antispam_callbacks_total{callback="check_event_for_spam",outcome="refused"} 1.0'
        in metrics
    )
    assert (
        'warden_antispam_callbacks_total{callback="user_may_join_room",outcome="allowed"} 1.0'
        in metrics
    )
    assert 'warden_antispam_callback_seconds_count{callback="check_event_for_spam"} 1.0' in metrics
    worker_metrics = httpx.get(f"{worker.metrics_url}/metrics").text
    assert 'warden_antispam_checks_total{kind="event",outcome="allowed"} 1.0' in worker_metrics
    assert token not in gateway.output() and token not in worker.output()

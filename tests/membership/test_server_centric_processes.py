"""The server-centric API on a gateway process (its federation listener), with a filter
worker process and a resident homeserver on HTTPS: a community token checks text and
joins rooms itself when allowed."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from tests.membership.conftest import WARDEN_USER
from tests.membership.remote_homeserver import RemoteHomeserver
from tests.service_processes import ServiceProcess
from warden.policy.harms import HARMS_FIELD, SPAM

Admin = Callable[[ServiceProcess], httpx.AsyncClient]


def q(room_id: str) -> str:
    return urllib.parse.quote(room_id, safe="")


def assert_error(r: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["errcode"] == errcode and body["error"], body
    return body


async def community_with_token(admin: httpx.AsyncClient, name: str) -> tuple[str, str]:
    r = await admin.post("/api/v1/communities/new", json={"name": name})
    assert r.status_code == 200, r.text
    community_id = str(r.json()["community_id"])
    r = await admin.post(f"/api/v1/communities/{community_id}/rotate_access_token")
    assert r.status_code == 200, r.text
    return community_id, str(r.json()["new_access_token"])


@pytest.mark.slow
async def test_check_text_and_self_join_on_the_gateway(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    spawn_service: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
) -> None:
    worker = spawn_service("filter-worker")
    gateway = start_gateway(PS_JOIN_SERVER=remote.name)
    await asyncio.to_thread(worker.wait_ready)
    admin = admin_client(gateway)
    community_id, token = await community_with_token(admin, "Self-serve community")
    other_id, _ = await community_with_token(admin, "Other community")
    assert gateway.api_url is not None
    async with httpx.AsyncClient(
        base_url=gateway.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as api:
        # Text, judged by the worker process (the instance's default keywords).
        r = await api.post("/_policyserv/v1/check/text", content=b"a friendly hello")
        assert r.status_code == 200 and r.json() == {}, r.text
        body = assert_error(
            await api.post("/_policyserv/v1/check/text", content=b"this is spam"),
            400,
            "ORG.MATRIX.MSC4387_SAFETY",
        )
        assert body["harms"] == body[HARMS_FIELD] == [SPAM]

        # Joining needs can_self_join_rooms.
        room_id = remote.create_room("10")
        path = f"/_policyserv/v1/join/{q(room_id)}"
        assert_error(await api.post(path), 403, "M_FORBIDDEN")
        assert remote.joins == []
        r = await admin.patch(
            f"/api/v1/communities/{community_id}", json={"can_self_join_rooms": True}
        )
        assert r.status_code == 200, r.text
        r = await api.post(path)
        assert r.status_code == 200, r.text
        assert r.json()["room_id"] == room_id and r.json()["community_id"] == community_id
        assert remote.joins[-1].event is not None
        assert remote.joins[-1].event["sender"] == WARDEN_USER
        stored = await pg_pool.fetchval(
            "SELECT community_id FROM rooms WHERE room_id = $1", room_id
        )
        assert stored == community_id

        # A room of another community is refused without a join.
        taken = remote.create_room("10")
        r = await admin.put(
            f"/api/v1/rooms/{q(taken)}", json={"room_version": "10", "community_id": other_id}
        )
        assert r.status_code == 200, r.text
        joins = len(remote.joins)
        assert_error(await api.post(f"/_policyserv/v1/join/{q(taken)}"), 403, "M_FORBIDDEN")
        assert len(remote.joins) == joins
        assert (
            await pg_pool.fetchval("SELECT community_id FROM rooms WHERE room_id = $1", taken)
            == other_id
        )

        assert_error(await api.post("/_policyserv/v1/join/not-a-room"), 400, "M_INVALID_PARAM")
        assert_error(await api.post(path, headers={"Authorization": ""}), 401, "M_MISSING_TOKEN")
        assert_error(
            await api.post(path, headers={"Authorization": "Bearer pst_nope"}),
            401,
            "M_UNKNOWN_TOKEN",
        )
        assert_error(await api.get(path), 405, "M_UNRECOGNIZED")

    # Neither process logged the token.
    assert token not in gateway.output() and token not in worker.output()
    metrics = httpx.get(f"{gateway.metrics_url}/metrics").text
    assert 'warden_server_centric_requests_total{endpoint="join",outcome="ok"} 1.0' in metrics
    worker_metrics = httpx.get(f"{worker.metrics_url}/metrics").text
    assert 'warden_text_checks_total{outcome="refused"} 1.0' in worker_metrics

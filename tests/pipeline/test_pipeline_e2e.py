"""The whole policy pipeline as separate processes: two gateways, two filter workers, the
moderator and the webhooks service, against real PostgreSQL, Redis and NATS, with origin
homeservers (HTTPS key servers), a homeserver's client API and a webhook target played
by local servers.

Proves, end to end: one verdict per event however many servers ask, on whichever
gateway; signatures Synapse accepts; refusals with harms; a hellban set through one
worker applied by the other; and a refused event redacted once and reported once.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from signedjson.key import read_signing_keys
from unpaddedbase64 import encode_base64

from tests.federation.conftest import https_server, tls_ca, tls_ca_file  # noqa: F401
from tests.gateway.conftest import DENIED_WITHOUT_LOOPBACK, start_origin  # noqa: F401
from tests.gateway.policy_harness import GATEWAY_NAME, SIGN_PATH, Origin, synapse_verifies
from tests.moderator.conftest import FakeClientAPI, fake_client_api, http_server  # noqa: F401
from tests.service_processes import ServiceProcess
from tests.webhooks.conftest import (  # noqa: F401
    WebhookReceiver,
    https_target,
    receiver,
    webhook_ca,
    webhook_ca_file,
)
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version
from warden.policy.harms import HARMS_FIELD, SPAM, SPAM_FLOODING

API_KEY = "e2e-admin-key"
MODERATOR = "@mod:hs.test"


def metric(svc: ServiceProcess, name: str, labels: str) -> float:
    """One sample from a service's /metrics (0 when absent)."""
    text = httpx.get(f"{svc.metrics_url}/metrics", timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", re.M)
    return sum(float(m) for m in pattern.findall(text))


def first_time_evaluations(worker: ServiceProcess) -> float:
    return metric(worker, "warden_evaluations_total", 'outcome="first_time"')


async def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def ask(
    client: httpx.AsyncClient, gateway: ServiceProcess, origin: Origin, event: dict[str, Any]
) -> httpx.Response:
    """``origin`` asks ``gateway`` to sign ``event``."""
    body = orjson.dumps(event)
    return await client.post(
        f"{gateway.api_url}{SIGN_PATH}",
        content=body,
        headers=origin.headers(SIGN_PATH, event),
    )


@pytest.mark.slow
async def test_whole_pipeline_across_processes(
    spawn_service: Callable[..., ServiceProcess],
    start_origin: Callable[[], Awaitable[Origin]],  # noqa: F811
    tls_ca_file: str,  # noqa: F811
    key_paths: tuple[Path, Path],
    http_server: Any,  # noqa: F811
    fake_client_api: FakeClientAPI,  # noqa: F811
    https_target: Any,  # noqa: F811
    receiver: WebhookReceiver,  # noqa: F811
    webhook_ca_file: str,  # noqa: F811
    pg_pool: asyncpg.Pool,
) -> None:
    asker = await start_origin()  # a server relaying the event (not the sender's)
    home = await start_origin()  # the sender's homeserver
    client_api = await http_server(fake_client_api)
    fake_client_api.tokens["tok"] = MODERATOR
    target = await https_target(receiver)
    loopback_ok = ",".join(DENIED_WITHOUT_LOOPBACK)

    gateway_env = {
        "PS_API_KEY": API_KEY,
        "PS_DIRECT_KEY_FETCHING": "true",
        "PS_KEY_QUERY_SERVER": "",
        "PS_FEDERATION_CA_FILE": tls_ca_file,
        "PS_HOMESERVER_DENIED_NETWORKS": loopback_ok,
    }
    gateways = [spawn_service("gateway", **gateway_env) for _ in range(2)]
    workers = [spawn_service("filter-worker") for _ in range(2)]
    moderator = spawn_service("moderator", PS_MODERATOR_ACCESS_TOKENS=f"{client_api.base_url}:tok")
    webhooks = spawn_service(
        "webhooks",
        PS_ALLOWED_WEBHOOK_DOMAINS="localhost",
        PS_WEBHOOK_CA_FILE=webhook_ca_file,
        PS_HOMESERVER_DENIED_NETWORKS=loopback_ok,
    )
    for svc in (*gateways, *workers, moderator, webhooks):
        await asyncio.to_thread(svc.wait_ready)

    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
    admin = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=gateways[0].api_url, timeout=30, headers=admin) as api:
        r = await api.post("/api/v1/communities/new", json={"name": "End to end"})
        assert r.status_code == 200, r.text
        community = r.json()["community_id"]
        r = await api.post(
            f"/api/v1/communities/{community}/config",
            json={
                "keyword_filter_keywords": ["buy-now"],
                "webhook_url": target.url("/hook"),
                "hellban_postfilter_minutes": 5,
            },
        )
        assert r.status_code == 200, r.text
        r = await api.put(
            f"/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
            json={"room_version": "12", "community_id": community},
        )
        assert r.status_code == 200, r.text
        r = await api.post(
            "/api/v1/set_room_moderator", json={"room_id": room_id, "moderator_user_id": MODERATOR}
        )
        assert r.status_code == 200, r.text

    v12 = get_room_version("12")
    policy_key = read_signing_keys(key_paths[1].open())[0]
    async with httpx.AsyncClient(timeout=30) as client:
        # 1. A neutral event asked for 24 times at once, by two servers, through both
        #    gateways: one evaluation, one stored verdict, one signature that verifies.
        before = sum(first_time_evaluations(w) for w in workers)
        neutral = home.event(room_id, "12", body="hello everyone", sender=f"@alice:{home.name}")
        answers = await asyncio.gather(
            *(
                ask(client, gw, origin, neutral)
                for gw in gateways
                for origin in (asker, home)
                for _ in range(6)
            )
        )
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
        signatures = {a.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID] for a in answers}
        assert len(signatures) == 1
        assert synapse_verifies("12", neutral, GATEWAY_NAME, signatures.pop(), policy_key)
        neutral_id = compute_event_id(v12, neutral)
        rows = await pg_pool.fetchval(
            "SELECT count(*) FROM verdicts WHERE event_id = $1", neutral_id
        )
        assert rows == 1
        assert sum(first_time_evaluations(w) for w in workers) == before + 1

        # 2. A message with the community's keyword, relayed by another server: refused
        #    with harms by both gateways, the same verdict each time.
        before = [first_time_evaluations(w) for w in workers]
        spam = home.event(room_id, "12", body="please buy-now", sender=f"@spammer:{home.name}")
        refusals = await asyncio.gather(*(ask(client, gw, asker, spam) for gw in gateways))
        for refusal in refusals:
            assert refusal.status_code == 400, refusal.text
            assert refusal.json()["errcode"] == "M_FORBIDDEN"
            assert SPAM in refusal.json()[HARMS_FIELD]
        assert refusals[0].json() == refusals[1].json()
        spam_id = compute_event_id(v12, spam)
        judge = next(i for i, w in enumerate(workers) if first_time_evaluations(w) > before[i])

        # 3. The spammer is now hellbanned in the community. Stop the worker that judged
        #    the spam: the other one must apply the ban it never set itself.
        assert workers[judge].stop() == 0
        other = workers[1 - judge]
        follow_up = home.event(
            room_id, "12", body="an innocent message", sender=f"@spammer:{home.name}"
        )
        r = await ask(client, gateways[0], home, follow_up)  # asked by the sender's own server
        assert r.status_code == 400, r.text
        assert SPAM_FLOODING in r.json()[HARMS_FIELD]
        assert first_time_evaluations(other) >= 1

    # 4. The moderator redacts the relayed spam once, through the room moderator's
    #    account; the follow-up, asked by the sender's own server, is left to it.
    def redactions_of(event_id: str) -> list[Any]:
        return [q for q in fake_client_api.requests if q.event_id == event_id]

    await eventually(lambda: redactions_of(spam_id), "the redaction of the spam")
    # 5. The webhook target gets one audit message for it.
    await eventually(lambda: spam_id in receiver.processed, "the audit webhook")
    await asyncio.sleep(1.0)  # anything duplicated would arrive within this
    spam_redactions = redactions_of(spam_id)
    assert len(spam_redactions) == 1
    assert spam_redactions[0].room_id == room_id
    assert spam_redactions[0].token == "tok"
    assert redactions_of(compute_event_id(v12, follow_up)) == []
    assert redactions_of(neutral_id) == []
    posts = [p for p in receiver.raw if p.headers.get("idempotency-key") == spam_id]
    assert len(posts) == 1
    report = posts[0].json()
    assert spam_id in report["text"]
    assert "buy-now" not in report["text"]  # content only inside the html's <details>
    # Each service logged what it did with the spam, as JSON lines naming the event.
    for svc in (moderator, webhooks):
        lines = [orjson.loads(ln) for ln in svc.output().splitlines() if ln.startswith("{")]
        assert any(spam_id in orjson.dumps(rec).decode() for rec in lines), svc.name

"""``/send`` through the real gateway and filter-worker processes: state learned from a
transaction is visible through the admin API, and an event that bypassed the policy
server gets its one verdict and a message the moderator acts on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client as NATS
from signedjson.key import read_signing_keys
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    Origin,
)
from tests.moderator.verdict_stream import fresh_durable
from tests.room_state.room_setup import seed_room
from tests.service_processes import ServiceProcess
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import VERDICTS_STREAM
from warden.federation.xmatrix import sign_request
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.event_signing import sign_event
from warden.matrix.keys import POLICY_SERVER_KEY_ID, verify_key_base64
from warden.matrix.room_versions import get_room_version
from warden.policy.verdict import Verdict

API = {"Authorization": "Bearer k"}


async def poll(fetch: Callable[[], Awaitable[Any]], what: str, timeout: float = 45) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await fetch()
        if value:
            return value
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
async def test_send_teaches_state_and_judges_events_that_bypassed_warden(
    spawn_service: Callable[..., ServiceProcess],
    key_paths: tuple[Path, Path],
    tls_ca_file: str,
    origin: Origin,
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
) -> None:
    env = {
        **DEV_ORIGIN_ENV,
        "PS_FEDERATION_CA_FILE": tls_ca_file,
        "PS_TRUSTED_ORIGINS": origin.name,  # never matrix.org from a test
    }
    worker = spawn_service("filter-worker", **env)
    gateway = spawn_service("gateway", PS_API_KEY="k", **env)
    await asyncio.to_thread(worker.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    policy_key = read_signing_keys(key_paths[1].open())[0]
    version = get_room_version("12")
    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)  # what the admin API takes
    quoted = urllib.parse.quote(room_id, safe="")
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    durable = f"test-send-e2e-{uuid.uuid4().hex[:8]}"
    await fresh_durable(js, durable)

    alice = f"@alice:{origin.name}"
    policy = origin.event(
        room_id,
        "12",
        event_type="m.room.policy",
        state_key="",
        content={"via": GATEWAY_NAME, "public_keys": {"ed25519": verify_key_base64(policy_key)}},
    )
    join = origin.event(
        room_id,
        "12",
        event_type="m.room.member",
        state_key=alice,
        content={"membership": "join", "displayname": "Alice Example"},
    )
    spam = origin.event(room_id, "12", body="this is spam", sender=alice)
    signed = origin.event(room_id, "12", body="asked warden first", sender=alice)
    sign_event(version, signed, GATEWAY_NAME, policy_key, POLICY_SERVER_KEY_ID)
    spam_id = str(compute_event_id(version, spam))
    signed_id = str(compute_event_id(version, signed))
    txn = {"origin": origin.name, "origin_server_ts": 1, "pdus": [policy, join, spam, signed]}
    uri = f"/_matrix/federation/v1/send/t{uuid.uuid4().hex}"

    try:
        async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as client:
            r = await client.put(
                f"/api/v1/rooms/{quoted}",
                headers=API,
                json={"room_version": "12", "community_id": "default"},
            )
            assert r.status_code == 200, r.text
            r = await client.get(f"/api/v1/rooms/{quoted}", headers=API)
            assert r.json()["policy_server"]["uses_warden"] is False
            # What a verified join would have taught Warden: alice created the room.
            await seed_room(pg_pool, origin, room_id, "12", members={alice: 100})

            auth = sign_request(origin.name, GATEWAY_NAME, "PUT", uri, txn, origin.key)
            r = await client.put(uri, json=txn, headers={"Authorization": auth})
            assert r.status_code == 200, r.text
            assert set(r.json()["pdus"]) == {
                str(compute_event_id(version, e)) for e in (policy, join, spam, signed)
            }

            async def policy_state() -> Any:
                body = (await client.get(f"/api/v1/rooms/{quoted}", headers=API)).json()
                return body["policy_server"] if body["policy_server"]["key_matches"] else None

            ps = await poll(policy_state, "the learned m.room.policy")
            assert ps == {
                "uses_warden": True,
                "via": GATEWAY_NAME,
                "public_key": verify_key_base64(policy_key),
                "key_matches": True,
            }
            assert (await client.get(f"/api/v1/rooms/{quoted}", headers=API)).json()[
                "last_cached_state_timestamp"
            ] > 0

            async def verdict() -> Any:
                r = await client.get(f"/api/v1/events/{urllib.parse.quote(spam_id)}", headers=API)
                return r.json() if r.status_code == 200 else None

            stored = await poll(verdict, "the verdict on the event that bypassed Warden")
            assert stored["class"] == "prohibited"
            assert stored["origin"] == GATEWAY_NAME  # so the moderator redacts it
            # The event that carried Warden's signature was not judged again.
            r = await client.get(f"/api/v1/events/{urllib.parse.quote(signed_id)}", headers=API)
            assert r.status_code == 404

            # /sign on the same event finds the same verdict: no second opinion.
            sign_auth = sign_request(origin.name, GATEWAY_NAME, "POST", SIGN_PATH, spam, origin.key)
            r = await client.post(SIGN_PATH, json=spam, headers={"Authorization": sign_auth})
            assert r.status_code == 400 and r.json()["errcode"] == "M_FORBIDDEN"
            again = await verdict()
            assert again["first_seen_ts"] == stored["first_seen_ts"]
            assert again["origin"] == GATEWAY_NAME

        # The verdict was published for the moderator, with our server as origin.
        sub = await js.pull_subscribe_bind(durable=durable, stream=VERDICTS_STREAM)
        published: Verdict | None = None
        deadline = time.monotonic() + 20
        while published is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                for m in await sub.fetch(batch=20, timeout=1):
                    await m.ack()
                    v = Verdict.from_json(m.data)
                    if v.event_id == spam_id:
                        published = v
        await sub.unsubscribe()
        assert published is not None, worker.output()
        assert published.origin == GATEWAY_NAME and published.extra.get("source") == "send"
        assert published.sender.partition(":")[2] != published.origin
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(VERDICTS_STREAM, durable)
    assert gateway.stop() == 0
    assert worker.stop() == 0, worker.output()

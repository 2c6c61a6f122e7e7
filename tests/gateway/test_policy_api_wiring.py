"""The running gateway wires the policy API and, with ``PS_API_KEY``, the admin API:
a room protected through ``/api/v1`` gets signatures from ``/sign``, and unprotecting
it reaches the gateway's room cache at once (``CONFIG_CHANGED_SUBJECT``)."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable

import httpx
import orjson
import pytest
from nats.aio.client import Client as NATS
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    SIGN_PATH,
    StandInWorker,
    allow,
    parse_output,
    run_command,
)
from tests.service_processes import ServiceProcess
from warden.bus.subjects import EVALUATE_SUBJECT

API_KEY = "test-admin-key"


@pytest.fixture
async def worker(nats_client: NATS) -> AsyncIterator[StandInWorker]:
    stand_in = await StandInWorker(nats_client, EVALUATE_SUBJECT, allow).start()
    yield stand_in
    await stand_in.stop()


@pytest.mark.slow
async def test_room_protected_through_the_admin_api_is_served_by_sign(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    worker: StandInWorker,
) -> None:
    gateway = spawn_service("gateway", PS_API_KEY=API_KEY, **DEV_ORIGIN_ENV)
    await asyncio.to_thread(gateway.wait_ready)
    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
    room_url = f"{gateway.api_url}/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}"
    admin = {"Authorization": f"Bearer {API_KEY}"}
    sign = ["--url", f"{gateway.api_url}{SIGN_PATH}", "--build-event", "--room", room_id]

    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(
            room_url, json={"room_version": "12", "community_id": "default"}, headers=admin
        )
        assert r.status_code == 200, r.text

        code, stdout, stderr = await run_command(service_env, *sign)
        assert code == 0, (stdout, stderr, gateway.output())
        assert parse_output(stdout)[0] == 200

        r = await client.delete(room_url, headers=admin)
        assert r.status_code == 200, r.text
        code, stdout, _ = await run_command(service_env, *sign)
        status, body = parse_output(stdout)
        assert status == 404
        assert body["errcode"] == "M_NOT_FOUND"
    # Only this room's requests: other gateways may share the machine's NATS subject.
    ours = [m for m in worker.requests if orjson.loads(m.data).get("room_id") == room_id]
    assert len(ours) == 1
    assert gateway.stop() == 0


@pytest.mark.slow
def test_admin_api_is_absent_without_an_api_key(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = spawn_service("gateway")
    gateway.wait_ready()
    r = httpx.get(f"{gateway.api_url}/api/v1/rooms", headers={"Authorization": "Bearer x"})
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_UNRECOGNIZED"
    r = httpx.post(f"{gateway.api_url}{SIGN_PATH}", content=b"{}")
    assert r.status_code == 401  # the policy API is there
    assert gateway.stop() == 0

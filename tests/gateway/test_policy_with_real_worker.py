"""The gateway and the real filter-worker service together, as processes: a room
protected through the admin API, an event signed via ``warden sign-request``."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from signedjson.key import read_signing_keys
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    parse_output,
    run_command,
    synapse_verifies,
)
from tests.service_processes import ServiceProcess
from warden.matrix.keys import POLICY_SERVER_KEY_ID


@pytest.mark.slow
async def test_gateway_and_filter_worker_sign_an_event(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    key_paths: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    worker = spawn_service("filter-worker")
    gateway = spawn_service("gateway", PS_API_KEY="k", **DEV_ORIGIN_ENV)
    await asyncio.to_thread(worker.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(
            f"{gateway.api_url}/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
            json={"room_version": "12", "community_id": "default"},
            headers={"Authorization": "Bearer k"},
        )
        assert r.status_code == 200, r.text

    saved = tmp_path / "event.json"
    code, stdout, stderr = await run_command(
        service_env,
        "--url",
        f"{gateway.api_url}{SIGN_PATH}",
        "--build-event",
        "--room",
        room_id,
        "--body-text",
        "hello, real worker",
        "--save-event",
        str(saved),
    )
    assert code == 0, (stdout, stderr, gateway.output(), worker.output())
    status, body = parse_output(stdout)
    assert status == 200
    event = orjson.loads(saved.read_bytes())
    policy_key = read_signing_keys(key_paths[1].open())[0]
    signature = body[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    assert synapse_verifies("12", event, GATEWAY_NAME, signature, policy_key)
    assert gateway.stop() == 0
    assert worker.stop() == 0

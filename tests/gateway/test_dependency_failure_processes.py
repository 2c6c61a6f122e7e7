"""H9 black-box, as processes: the gateway and a real filter worker, ``displaynames``
locked while a neutral message is signed (503, nothing stored), then signed once the lock
is released."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    parse_output,
    run_command,
)
from tests.service_processes import ServiceProcess


@pytest.mark.slow
async def test_a_locked_table_is_503_then_the_event_is_signed(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    pg_database: str,
    pg_pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    worker = spawn_service("filter-worker", PS_FILTER_TIMEOUT_SECONDS="1")
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
    url = f"{gateway.api_url}{SIGN_PATH}"

    locker = await asyncpg.connect(pg_database)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE displaynames IN ACCESS EXCLUSIVE MODE")
        _, stdout, stderr = await run_command(
            service_env,
            *("--url", url, "--build-event", "--room", room_id),
            *("--body-text", "an ordinary message", "--save-event", str(saved)),
        )
        await tx.rollback()
    finally:
        await locker.close()
    status, body = parse_output(stdout)
    assert status == 503, (stdout, stderr, worker.output())
    assert body["errcode"] == "M_UNKNOWN"
    assert await pg_pool.fetchval("SELECT count(*) FROM verdicts WHERE room_id = $1", room_id) == 0

    _, stdout, stderr = await run_command(service_env, "--url", url, "--body", str(saved))
    status, body = parse_output(stdout)
    assert status == 200, (stdout, stderr, worker.output())
    assert GATEWAY_NAME in body
    assert gateway.stop() == 0
    assert worker.stop() == 0

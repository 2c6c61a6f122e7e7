"""M6 black-box, as processes: a gateway and a filter worker whose Redis is down start,
report ready (degraded) and sign; when Redis comes up they use it, without a restart;
when it dies again they go on signing."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Callable

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    parse_output,
    run_command,
)
from tests.private_redis import PrivateRedis
from tests.service_processes import ServiceProcess
from warden import redis_keys


async def _sign(env: dict[str, str], url: str, room_id: str, text: str) -> tuple[int, object]:
    _, stdout, stderr = await run_command(
        env, *("--url", url, "--build-event", "--room", room_id, "--body-text", text)
    )
    assert stdout, stderr
    return parse_output(stdout)


def _fallbacks(metrics: str, use: str) -> float:
    prefix = f'warden_redis_fallbacks_total{{use="{use}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


@pytest.mark.slow
async def test_sign_without_redis_then_with_it_then_without_it_again(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    pg_pool: asyncpg.Pool,
) -> None:
    redis = PrivateRedis()  # not started: nothing listens on its port yet
    down = {"PS_REDIS_URL": redis.url}
    try:
        # No hellban: its filters keep their state in Redis and cannot judge without it.
        worker = spawn_service("filter-worker", PS_HELLBAN_POSTFILTER_MINUTES="0", **down)
        gateway = spawn_service("gateway", PS_API_KEY="k", **DEV_ORIGIN_ENV, **down)
        await asyncio.to_thread(worker.wait_ready)
        await asyncio.to_thread(gateway.wait_ready)
        async with httpx.AsyncClient(timeout=30) as client:
            ready = (await client.get(f"{gateway.metrics_url}/readyz")).json()
            assert ready["status"] == "degraded" and ready["checks"]["redis"] != "ok"
            room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
            r = await client.put(
                f"{gateway.api_url}/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
                json={"room_version": "12", "community_id": "default"},
                headers={"Authorization": "Bearer k"},
            )
            assert r.status_code == 200, r.text
            url = f"{gateway.api_url}{SIGN_PATH}"

            status, body = await _sign(service_env, url, room_id, "said while Redis is down")
            assert status == 200, (body, worker.output())
            assert isinstance(body, dict) and GATEWAY_NAME in body
            metrics = (await client.get(f"{worker.metrics_url}/metrics")).text
            assert _fallbacks(metrics, "claims") >= 1

            redis.start()
            await asyncio.sleep(1.5)  # past the 1 s skip after the last failure
            status, body = await _sign(service_env, url, room_id, "said once Redis is back")
            assert status == 200, (body, worker.output())
            for _ in range(50):
                ready = (await client.get(f"{gateway.metrics_url}/readyz")).json()
                if ready["status"] == "ok":
                    break
                await asyncio.sleep(0.1)
            assert ready["status"] == "ok"
            check = aioredis.Redis.from_url(redis.url)
            try:
                cached = await check.keys(redis_keys.verdict("*"))
            finally:
                await check.aclose()
            assert len(cached) == 1  # the worker cached the second verdict there

            redis.stop()
            status, body = await _sign(service_env, url, room_id, "said after Redis died")
            assert status == 200, (body, worker.output())
        stored = await pg_pool.fetchval("SELECT count(*) FROM verdicts WHERE room_id = $1", room_id)
        assert stored == 3
        assert gateway.stop() == 0
        assert worker.stop() == 0
    finally:
        redis.stop()

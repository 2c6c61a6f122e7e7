"""L2 black-box, as processes: a filter worker is SIGKILLed while it judges an event (its
classifier call held open by a real local moderation server). The gateway, getting no
answer within the claim TTL, asks again; the other worker takes the dead worker's lapsed
claim over and judges the event: the same /sign request is answered 200, and the event
has one stored verdict."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.parse
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from unpaddedbase64 import encode_base64

from tests.filters.moderation_service import API_KEY, MODEL, Moderations
from tests.filters.moderation_service import service as service  # a fixture
from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    parse_output,
    run_command,
)
from tests.local_servers import ThreadedServer
from tests.service_processes import ServiceProcess

WORKER_CLAIM_TTL = "1"
GATEWAY_REASK_AFTER = "8"  # the gateway's PS_EVALUATION_CLAIM_TTL_SECONDS
GATEWAY_TIMEOUT = "20"


def _reasks(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("warden_verdict_reasks_total "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
async def test_a_worker_killed_mid_evaluation_is_taken_over_within_the_same_request(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    pg_pool: asyncpg.Pool,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, server = service
    moderations.hold = threading.Event()  # the first classifier call hangs
    room_id = "!" + encode_base64(os.urandom(32), urlsafe=True)
    worker_env = {
        "PS_EVALUATION_CLAIM_TTL_SECONDS": WORKER_CLAIM_TTL,
        "PS_OPENAI_FILTER_API_KEY": API_KEY,
        "PS_OPENAI_FILTER_BASE_URL": f"{server.base_url}/v1",
        "PS_OPENAI_FILTER_MODEL": MODEL,
        "PS_OPENAI_FILTER_ALLOWED_NETWORKS": "127.0.0.1/32",
        "PS_OPENAI_FILTER_TIMEOUT_SECONDS": "15",
        "PS_FILTER_TIMEOUT_SECONDS": "15",  # the pipeline's bound on each filter
        "PS_OPENAI_FILTER_ALLOWED_ROOM_IDS": room_id,
    }
    doomed = spawn_service("filter-worker", **worker_env)
    gateway = spawn_service(
        "gateway",
        PS_API_KEY="k",
        PS_VERDICT_TIMEOUT_SECONDS=GATEWAY_TIMEOUT,
        PS_EVALUATION_CLAIM_TTL_SECONDS=GATEWAY_REASK_AFTER,
        **DEV_ORIGIN_ENV,
    )
    await asyncio.to_thread(doomed.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.put(
            f"{gateway.api_url}/api/v1/rooms/{urllib.parse.quote(room_id, safe='')}",
            json={"room_version": "12", "community_id": "default"},
            headers={"Authorization": "Bearer k"},
        )
        assert r.status_code == 200, r.text

        began = time.monotonic()
        signing = asyncio.create_task(
            run_command(
                service_env,
                *("--url", f"{gateway.api_url}{SIGN_PATH}", "--build-event"),
                *("--room", room_id, "--body-text", "judged twice, decided once"),
            )
        )
        for _ in range(300):  # the only worker is judging it: its classifier call is held
            if moderations.held:
                break
            await asyncio.sleep(0.05)
        assert moderations.held == 1, doomed.output()

        survivor = spawn_service("filter-worker", **worker_env)
        await asyncio.to_thread(survivor.wait_ready)
        doomed.proc.kill()  # dies holding the claim, and the gateway's request with it
        doomed.proc.wait(10)
        moderations.hold.set()  # the next classifier call is answered at once

        _, stdout, stderr = await signing
        took = time.monotonic() - began
        status, body = parse_output(stdout)
        assert status == 200, (stdout, stderr, survivor.output())
        assert isinstance(body, dict) and GATEWAY_NAME in body
        assert took < float(GATEWAY_TIMEOUT)
        metrics = (await client.get(f"{gateway.metrics_url}/metrics")).text
        assert _reasks(metrics) == 1

    assert len(moderations.received) == 2  # judged by both; one verdict
    stored = await pg_pool.fetch("SELECT class FROM verdicts WHERE room_id = $1", room_id)
    assert len(stored) == 1
    assert gateway.stop() == 0
    assert survivor.stop() == 0

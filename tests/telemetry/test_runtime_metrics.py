"""Process metrics every service exports: DB pool use, event-loop lag, no ``_created``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from prometheus_client import REGISTRY, generate_latest

from tests.moderator.verdict_stream import wait_for
from tests.service_processes import free_port
from warden.runtime import dependencies
from warden.runtime.service import ServiceRuntime
from warden.settings import Settings
from warden.telemetry.runtime_metrics import measure_loop_lag


def pool_state(state: str) -> float:
    return REGISTRY.get_sample_value("warden_db_pool_connections", {"state": state}) or 0.0


def lag(suffix: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"warden_event_loop_lag_seconds{suffix}", labels) or 0.0


async def test_pool_gauges_move_while_a_connection_is_held(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(database_max_open_conns=3, database_max_idle_conns=1)
    runtime = ServiceRuntime("test", settings)
    in_use, idle, maximum = pool_state("in_use"), pool_state("idle"), pool_state("max")
    pool = await dependencies.postgres(runtime)
    try:
        assert pool_state("max") == maximum + 3
        assert pool_state("in_use") == in_use
        assert pool_state("idle") >= idle + 1  # min_size connections were opened
        async with pool.acquire() as held:
            assert await held.fetchval("SELECT 1") == 1
            assert pool_state("in_use") == in_use + 1
            async with pool.acquire():
                assert pool_state("in_use") == in_use + 2
        assert pool_state("in_use") == in_use
        assert pool_state("idle") >= idle + 2
    finally:
        await pool.close()
    # A closed pool is no longer reported.
    assert pool_state("max") == maximum
    assert pool_state("idle") == idle


async def test_loop_lag_records_how_long_the_loop_was_blocked() -> None:
    task = asyncio.create_task(measure_loop_lag(0.01))
    try:
        await asyncio.sleep(0.05)  # the task is waiting on its timer
        count, total = lag("_count"), lag("_sum")
        fast = lag("_bucket", le="0.1")
        time.sleep(0.4)  # a blocking call on the loop: nothing else can run meanwhile
        await wait_for(lambda: lag("_count") >= count + 1, "a lag sample")
    finally:
        task.cancel()
    # The timer due during the block ran at least 0.3 s late.
    assert lag("_sum") - total >= 0.3
    assert lag("_bucket", le="0.1") - fast < lag("_count") - count


async def test_every_service_runtime_measures_loop_lag_and_exports_no_created_series() -> None:
    runtime = ServiceRuntime("test", Settings(shutdown_delay_seconds=0))
    port = free_port()
    runtime.add_http_server("metrics", runtime.health_app(), f"127.0.0.1:{port}")
    before = lag("_count")
    serving = asyncio.create_task(runtime.serve())
    try:
        await wait_for(lambda: lag("_count") > before, "a loop lag sample from the runtime")
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        runtime.request_stop()
        await asyncio.wait_for(serving, 30)
    assert "warden_event_loop_lag_seconds_count" in text
    assert 'warden_db_pool_connections{state="in_use"}' in text
    assert "warden_http_requests_total" in text or "warden_ready" in text
    assert "_created" not in text
    assert b"_created" not in generate_latest(REGISTRY)

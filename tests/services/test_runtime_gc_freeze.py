"""A service process moves its start-up objects out of the garbage collector's sight
once it serves, so full collections under load scan only what requests made, and
collects its young generation less often than CPython's default."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.service_processes import free_port

ROOT = Path(__file__).resolve().parents[2]

# A service built the way the real ones are (``bootstrap`` then ``serve``), answering
# with what the collector sees: frozen objects, and objects still tracked.
SERVICE = """
import asyncio, gc, sys
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings

async def counts(request):
    return JSONResponse({
        "frozen": gc.get_freeze_count(),
        "tracked": len(gc.get_objects()),
        "threshold": gc.get_threshold(),
    })

async def main():
    runtime = bootstrap("gc-test", Settings(shutdown_delay_seconds=0))
    runtime.add_http_server("api", Starlette(routes=[Route("/gc", counts)]), sys.argv[1])
    await runtime.serve()

sys.exit(run_async(main))
"""


def test_a_serving_service_has_frozen_its_start_up_objects() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVICE, f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                counts = httpx.get(f"http://127.0.0.1:{port}/gc", timeout=5).json()
                # The freeze follows the listeners' start by a loop iteration or two, so
                # the very first answer may come before it.
                if counts["frozen"] > 0 or time.monotonic() >= deadline:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, "the service exited"
                assert time.monotonic() < deadline, "the service never answered"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # Modules, the app and its clients: tens of thousands of objects, now frozen; what is
    # still tracked is what was made since (this request, a few connections).
    assert counts["frozen"] > 10_000
    assert counts["tracked"] < counts["frozen"] / 5
    # Young collections every 20,000 net new objects, not CPython's 700; the older
    # generations keep their defaults.
    assert counts["threshold"] == [20_000, 10, 10]


def test_an_embedded_runtime_leaves_the_collector_alone() -> None:
    from warden.runtime.service import ServiceRuntime
    from warden.settings import Settings

    assert ServiceRuntime("embedded", Settings()).freeze_startup_objects is False
    assert gc.get_threshold()[0] == 700  # the test process's own, untouched

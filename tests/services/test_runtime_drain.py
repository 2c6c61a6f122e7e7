"""The service runtime drains in-flight HTTP requests before it returns."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.service_processes import free_port
from warden.runtime.service import ServiceRuntime
from warden.settings import Settings


async def test_request_in_flight_at_stop_completes_and_hooks_run_after() -> None:
    started = asyncio.Event()
    order: list[str] = []

    async def slow(request: Request) -> PlainTextResponse:
        started.set()
        await asyncio.sleep(1.0)
        order.append("request done")
        return PlainTextResponse("finished")

    settings = Settings(shutdown_delay_seconds=0.2, shutdown_timeout_seconds=10)
    runtime = ServiceRuntime("test", settings)
    port = free_port()
    runtime.add_http_server("api", Starlette(routes=[Route("/slow", slow)]), f"127.0.0.1:{port}")

    async def hook() -> None:
        order.append("hook")

    runtime.add_shutdown_hook("hook", hook)
    serving = asyncio.create_task(runtime.serve())
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            try:
                await client.get(f"http://127.0.0.1:{port}/missing")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
        in_flight = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/slow"))
        await started.wait()
        runtime.request_stop()
        assert runtime.health.draining
        response = await in_flight
    assert response.status_code == 200
    assert response.text == "finished"
    await asyncio.wait_for(serving, 15)
    assert order == ["request done", "hook"]
    # The listener is closed once serve() returned.
    async with httpx.AsyncClient() as client:
        try:
            await client.get(f"http://127.0.0.1:{port}/slow")
            raise AssertionError("still listening after drain")
        except httpx.ConnectError:
            pass

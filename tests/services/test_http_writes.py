"""Responses leave in one write: the status line and headers with the body, not apart.

A real uvicorn server on a real socket, serving through ``CoalescingHttpToolsProtocol``;
the transport under it counts the writes it is handed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from tests.service_processes import free_port
from warden.runtime.http_writes import CoalescingHttpToolsProtocol

WRITES: list[bytes] = []


class _CountingTransport:
    """The real transport, with every write it is handed recorded."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _CountedProtocol(CoalescingHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        counted: Any = _CountingTransport(transport)
        super().connection_made(counted)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/stream":
        # Chunks sent across loop iterations still leave, in order.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"end"})
        return
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server() -> AsyncIterator[str]:
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=_CountedProtocol, log_config=None, lifespan="off"
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        await task


async def test_each_response_is_one_write(server: str) -> None:
    WRITES.clear()
    async with httpx.AsyncClient(base_url=server) as client:  # one keep-alive connection
        for _ in range(20):
            r = await client.get("/")
            assert r.status_code == 200 and r.json() == {"ok": True}
    assert len(WRITES) == 20  # uvicorn alone makes 40: headers, then body
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b'{"ok":true}') for w in WRITES)


async def test_streamed_responses_arrive_whole_and_in_order(server: str) -> None:
    async with httpx.AsyncClient(base_url=server) as client:
        r = await client.get("/stream")
        assert r.text == "part0;part1;part2;end"
        # The connection is still good afterwards.
        assert (await client.get("/")).json() == {"ok": True}


async def test_a_closed_connection_gets_its_response_first(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, headers={"connection": "close"}) as client:
        for _ in range(3):
            r = await client.get("/")
            assert r.json() == {"ok": True}

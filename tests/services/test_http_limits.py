"""``LimitedHttpToolsProtocol`` keeps what uvicorn's protocol does for clients within
the limits: header handling, ``Expect: 100-continue``, pipelined requests with large
bodies (whose bytes must not count against the next request's head).

A real uvicorn server on a real socket; the black-box tests of the limits themselves,
against a real gateway, are in ``tests/gateway/test_http_front.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from tests.local_servers import serve_behind_front
from tests.service_processes import free_port
from warden.runtime.http_limits import HttpLimits


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers the body's length and the headers it saw."""
    assert scope["type"] == "http"
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = orjson.dumps(
        {"size": size, "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]]}
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    limits = HttpLimits(max_header_bytes=4096, max_headers=16)
    async with serve_behind_front(echo, limits, port):
        yield "127.0.0.1", port


async def _responses(reader: asyncio.StreamReader, count: int) -> list[tuple[bytes, bytes]]:
    found = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        found.append((head, await reader.readexactly(length)))
    return found


async def test_pipelined_requests_with_large_bodies_are_served(server: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*server)
    body = b"x" * 200_000  # far more than PS_HTTP_MAX_HEADER_BYTES, in the same writes
    request = b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    writer.write(request * 3)
    await writer.drain()
    answers = await asyncio.wait_for(_responses(reader, 3), 30)
    for head, payload in answers:
        assert head.startswith(b"HTTP/1.1 200 ")
        assert orjson.loads(payload)["size"] == len(body)
    writer.close()


async def test_headers_and_expect_continue_work_as_in_uvicorn(server: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*server)
    writer.write(
        b"PUT /b HTTP/1.1\r\nHost: t\r\nX-Trailing-Space: v  \r\nContent-Length: 3\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    assert (
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        == b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"abc")
    ((head, payload),) = await asyncio.wait_for(_responses(reader, 1), 30)
    assert head.startswith(b"HTTP/1.1 200 ")
    seen = orjson.loads(payload)
    assert seen["size"] == 3
    assert ["x-trailing-space", "v"] in seen["headers"]
    writer.close()


async def test_an_oversized_head_gets_its_431_not_a_reset(server: tuple[str, int]) -> None:
    """A head far past the limit, sent at once: the server answers 431 while most of it
    is still unread. Closing then would make the kernel reset the connection, which can
    reach the client before the answer; the server half-closes and drains instead, so
    every such client reads its 431 (many tries: the reset was a race)."""
    host, port = server
    big = b"X-Filler: " + b"a" * 60_000 + b"\r\n"
    request = b"PUT /x HTTP/1.1\r\nHost: t\r\n" + big * 4 + b"\r\n"
    for _ in range(30):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            async with asyncio.timeout(5):
                answer = await reader.read()  # until the server's end of the stream
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert b'"errcode":"M_TOO_LARGE"' in answer

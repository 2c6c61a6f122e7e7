"""The Python fallback load generator survives what a server may answer.

CI once lost a whole ``make test`` because one connection read a chunked body as
if it had none and then took the trailing chunk for a status line. These tests run
it against a real local server that answers with chunked bodies and closes
connections mid-run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.loadgen import _one_connection, _read_response

CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"
)
FIXED = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\n{}"


async def test_read_response_consumes_chunked_and_fixed_bodies() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(CHUNKED + FIXED)
    reader.feed_eof()
    assert await _read_response(reader) == "200"
    assert await _read_response(reader) == "403"


async def test_read_response_refuses_a_line_that_is_no_status_line() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"0\r\n\r\n")
    reader.feed_eof()
    try:
        await _read_response(reader)
    except ValueError:
        return
    raise AssertionError("a garbled head was taken for a response")


async def test_connection_closed_by_the_server_is_replaced() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        # Two answers (chunked, then fixed), then the server hangs up.
        for answer in (CHUNKED, FIXED):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stats: dict[str, Any] = {
        "latencies_ms": [],
        "statuses": {},
        "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "wraps": 0,
    }
    request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    async with server:
        await _one_connection(
            f"127.0.0.1:{port}", [request], [-1], time.monotonic() + 0.5, 0.0, stats
        )
    assert connections >= 2, "the generator stopped after the first hang-up"
    assert stats["statuses"].get("200", 0) >= 2
    assert stats["statuses"].get("403", 0) >= 2
    assert stats["errors"]["read"] >= 1

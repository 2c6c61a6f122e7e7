"""``read_limited_body`` over ASGI messages: one or many chunks, the limit checked while
reading, and a client that goes away."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from starlette.requests import Request

from warden.matrix.errors import TooLarge
from warden_gateway.request_body import ClientGone, read_limited_body


def _request(messages: Iterable[dict[str, object]], headers: list[tuple[bytes, bytes]]) -> Request:
    queue = list(messages)
    received: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        message = queue.pop(0)
        received.append(message)
        return message

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    request = Request(scope, receive)  # type: ignore[arg-type]
    request.state.received = received
    return request


def _chunks(*parts: bytes) -> list[dict[str, object]]:
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


@pytest.mark.parametrize(
    "parts", [(b'{"a":1}',), (b'{"a"', b"", b":1}"), (b"", b'{"a":1}'), (b"",)]
)
async def test_the_whole_body_in_one_or_many_messages(parts: tuple[bytes, ...]) -> None:
    request = _request(_chunks(*parts), [])
    assert await read_limited_body(request, 100) == b"".join(parts)
    assert len(request.state.received) == len(parts)  # nothing read past the last


async def test_the_limit_holds_across_chunks_without_a_length() -> None:
    request = _request(_chunks(b"x" * 60, b"y" * 60, b"never read"), [])
    with pytest.raises(TooLarge):
        await read_limited_body(request, 100)
    assert len(request.state.received) == 2  # refused as soon as it went over


async def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    request = _request(_chunks(b"x"), [(b"content-length", b"101")])
    with pytest.raises(TooLarge):
        await read_limited_body(request, 100)
    assert request.state.received == []


async def test_a_client_that_goes_away_mid_body() -> None:
    messages = [*_chunks(b"x", b"y")[:1], {"type": "http.disconnect"}]
    with pytest.raises(ClientGone):
        await read_limited_body(_request(messages, []), 100)

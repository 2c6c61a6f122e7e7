"""``JSONBytesResponse`` sends what Starlette's ``Response`` would for the same JSON."""

from __future__ import annotations

import pytest
from starlette.responses import Response

from warden.matrix.errors import LimitExceeded
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.json_response import JSONBytesResponse


@pytest.mark.parametrize("status", [200, 400, 401, 404, 429, 500, 503])
@pytest.mark.parametrize("body", [b"{}", b'{"warden.test":{"ed25519:policy_server":"x"}}'])
async def test_same_messages_as_starlettes_response(status: int, body: bytes) -> None:
    async def messages(response: Response) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await response({"type": "http"}, None, send)  # type: ignore[arg-type]
        return sent

    ours = await messages(JSONBytesResponse(body, status))
    theirs = await messages(Response(body, status_code=status, media_type="application/json"))
    assert ours == theirs
    assert (b"content-length", str(len(body)).encode()) in ours[0]["headers"]  # type: ignore[operator]


def test_retry_after_is_added_to_error_responses() -> None:
    limited = error_response(LimitExceeded("slow down", retry_after_ms=1500))
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.headers["content-type"] == "application/json"
    busy = error_response(TemporarilyUnavailable("later", retry_after_seconds=7))
    assert (busy.status_code, busy.headers["retry-after"]) == (503, "7")

"""Every error the gateway sends is a Matrix error body: ``{"errcode", "error"}``."""

from __future__ import annotations

import logging

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from warden.matrix.errors import MatrixError, Unavailable
from warden_gateway.json_response import JSONBytesResponse

logger = logging.getLogger(__name__)


def matrix_error_response(status: int, errcode: str, error: str, **extra: object) -> Response:
    """A JSON Matrix error response."""
    body = {"errcode": errcode, "error": error, **extra}
    return JSONBytesResponse(orjson.dumps(body), status)


class TemporarilyUnavailable(Unavailable):
    """503 ``M_UNKNOWN`` with a ``Retry-After`` header (seconds): try again soon."""

    def __init__(self, error: str, *, retry_after_seconds: int = 1) -> None:
        super().__init__(error)
        self.retry_after_seconds = retry_after_seconds


def error_response(exc: MatrixError) -> Response:
    """The response for a ``MatrixError``.

    ``retry_after_ms`` in the body (``M_LIMIT_EXCEEDED``) also sets ``Retry-After``, as
    does a ``TemporarilyUnavailable``.
    """
    resp = JSONBytesResponse(orjson.dumps(exc.to_dict()), exc.status)
    retry_ms = exc.extra.get("retry_after_ms")
    if isinstance(retry_ms, int):
        resp.headers["Retry-After"] = str(max(1, (retry_ms + 999) // 1000))
    elif isinstance(exc, TemporarilyUnavailable):
        resp.headers["Retry-After"] = str(exc.retry_after_seconds)
    return resp


async def on_matrix_error(request: Request, exc: Exception) -> Response:
    """Handler for ``MatrixError`` raised anywhere below."""
    assert isinstance(exc, MatrixError)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's routing errors, in Matrix form: unknown path or method is M_UNRECOGNIZED."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (404, 405):
        resp = matrix_error_response(exc.status_code, "M_UNRECOGNIZED", "Unrecognized request")
        if exc.headers:
            resp.headers.update(exc.headers)  # e.g. Allow on 405
        return resp
    return matrix_error_response(exc.status_code, "M_UNKNOWN", str(exc.detail))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A bug on our side: log it with its traceback, answer 500 M_UNKNOWN."""
    logger.exception("unhandled error", extra={"path": request.url.path})
    return matrix_error_response(500, "M_UNKNOWN", "Internal server error")

"""Outbound HTTP to parties that are not federation peers: client APIs and webhooks.

Shared by the moderator (redactions through a homeserver's Client-Server API) and the
webhooks service. What they need alike: a bounded read of a response (a hostile or
broken server cannot make us buffer gigabytes), and one rule for sorting an attempt's
result into done, worth retrying, or not worth retrying.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from enum import Enum

import httpx
import orjson

from warden.telemetry.metrics import WARDEN_VERSION

USER_AGENT = f"Warden/{WARDEN_VERSION}"
# We never need more of a response than an error object.
MAX_RESPONSE_BYTES = 64 * 1024
# A server asking for longer than this is asked again after this long.
MAX_RETRY_AFTER_SECONDS = 3600.0
_MAX_ERROR_CHARS = 200


class Result(Enum):
    """How one attempt ended."""

    OK = "ok"
    TEMPORARY = "temporary"  # may succeed later: 5xx, 408, 425, 429, network failures
    PERMANENT = "permanent"  # will not: other 4xx, redirects, refused destinations


@dataclass(frozen=True)
class Attempt:
    """One attempt's result, in the terms callers log and record."""

    result: Result
    status: int | None = None  # the HTTP status when there was an answer
    error: str = ""  # short, for logs and records; never request content
    retry_after: float | None = None  # seconds the server asked us to wait


def classify_status(status: int) -> Result:
    """2xx is OK; 408, 425, 429 and 5xx are temporary; anything else is permanent.

    3xx is permanent because redirects are never followed: a webhook or client API URL
    that redirects is misconfigured, and following it could lead anywhere.
    """
    if 200 <= status < 300:
        return Result.OK
    if status >= 500 or status in (408, 425, 429):
        return Result.TEMPORARY
    return Result.PERMANENT


async def read_capped(response: httpx.Response, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """Read at most ``limit`` bytes of a streaming response's body, then stop."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def retry_after_seconds(response: httpx.Response, body: bytes) -> float | None:
    """The wait a server asked for: Matrix ``retry_after_ms``, else ``Retry-After``."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        ms = data.get("retry_after_ms")
        if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
            return min(MAX_RETRY_AFTER_SECONDS, ms / 1000.0)
    header = response.headers.get("retry-after")
    if header is None:
        return None
    header = header.strip()
    if header.isdigit():
        return min(MAX_RETRY_AFTER_SECONDS, float(header))
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, when.timestamp() - time.time()))


def describe_answer(status: int, body: bytes) -> str:
    """``HTTP 403 M_FORBIDDEN: reason`` from a Matrix error body, else ``HTTP 403``."""
    detail = f"HTTP {status}"
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        errcode, error = data.get("errcode"), data.get("error")
        if isinstance(errcode, str):
            detail += f" {errcode[:64]}"
        if isinstance(error, str):
            detail += f": {error[:_MAX_ERROR_CHARS]}"
    return detail


async def attempt_from_response(response: httpx.Response) -> Attempt:
    """Classify an answered request, reading at most ``MAX_RESPONSE_BYTES`` of it."""
    body = await read_capped(response)
    result = classify_status(response.status_code)
    if result is Result.OK:
        return Attempt(Result.OK, response.status_code)
    error = describe_answer(response.status_code, body)
    if 300 <= response.status_code < 400:
        error += " (redirects are not followed)"
    return Attempt(
        result,
        response.status_code,
        error,
        retry_after_seconds(response, body) if result is Result.TEMPORARY else None,
    )


def attempt_from_exception(exc: httpx.HTTPError) -> Attempt:
    """Classify a request that got no answer: network failures are temporary."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return Attempt(Result.PERMANENT, None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])
    return Attempt(Result.TEMPORARY, None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])

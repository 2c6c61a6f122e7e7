"""A small synchronous client of the admin API (``/api/v1``) for the command line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from warden.settings import local_url

ADMIN_PREFIX = "/api/v1"
# Where the CLI looks for the admin API when neither --url nor WARDEN_ADMIN_URL is given.
URL_ENV = "WARDEN_ADMIN_URL"
KEY_ENV = "PS_API_KEY"
# Characters of an error body quoted when it is not a Matrix error (an HTML page, say).
_MAX_FOREIGN_BODY = 200


class AdminError(Exception):
    """The admin API refused a request, or could not be reached.

    ``errcode`` is the Matrix errcode of the answer; for answers that are not Matrix
    errors and for network failures it is a label the CLI made up (``HTTP_<status>``,
    ``CONNECTION_FAILED``), so the printed line always starts with a code.
    """

    def __init__(self, errcode: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{errcode}: {message}")
        self.errcode = errcode
        self.message = message
        self.status = status

    def line(self) -> str:
        """The error as one line (no newline inside, whatever the server sent)."""
        status = f" (HTTP {self.status})" if self.status is not None else ""
        return " ".join(f"{self.errcode}: {self.message}{status}".split())


def default_url(environ: Mapping[str, str] | None = None) -> str:
    """``WARDEN_ADMIN_URL``, else the admin listener ``PS_ADMIN_HTTP_BIND``, else
    ``PS_HTTP_BIND`` (where the admin API is served when it has no listener of its own);
    a wildcard bind address is reached on loopback."""
    env = os.environ if environ is None else environ
    url = env.get(URL_ENV, "").strip()
    if url:
        return url
    bind = env.get("PS_ADMIN_HTTP_BIND", "").strip() or env.get("PS_HTTP_BIND", "").strip()
    return local_url(bind or "0.0.0.0:8080")


def path_part(value: str) -> str:
    """One path segment: room and event IDs may hold ``/``, ``?``, ``#``…"""
    return quote(value, safe="")


class AdminClient:
    """Calls the admin API with the bearer key; every failure is an ``AdminError``."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url + ADMIN_PREFIX,
            # UTF-8 bytes: the server compares the key's UTF-8 bytes, and httpx would
            # refuse a non-ASCII str header.
            headers={b"Authorization": b"Bearer " + api_key.encode("utf-8")},
            timeout=timeout,
            trust_env=False,  # an operator's proxy variables must not see the admin key
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """Send a request; return the decoded JSON answer of a 2xx response."""
        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = self._client.request(
                method, path, json=json, content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise AdminError("CONNECTION_FAILED", f"{self.base_url}: {reason}") from None
        return _decode(response)


def _decode(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        if body is None and response.content:
            raise AdminError(
                "BAD_RESPONSE", "the admin API answered with something that is not JSON"
            )
        return body
    if isinstance(body, dict) and isinstance(body.get("errcode"), str):
        message = body.get("error")
        raise AdminError(
            body["errcode"],
            message if isinstance(message, str) and message else "(no message)",
            response.status_code,
        )
    text = response.text[:_MAX_FOREIGN_BODY].strip() or response.reason_phrase
    raise AdminError(f"HTTP_{response.status_code}", text, response.status_code)

"""Fixtures for the moderator tests: a stand-in homeserver Client-Server API on loopback.

``FakeClientAPI`` answers ``whoami`` and the redact endpoint the way a homeserver does
for what the moderator uses: it knows which user each access token belongs to, and it
deduplicates redactions by (access token, transaction ID), answering a repeat with the
first redaction's event ID. Tests can script answers (status, body, delay) per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from nats.aio.client import Client as NATS

from tests.local_servers import ThreadedServer, start_threaded, stop_all
from warden.bus.streams import ensure_verdicts_stream


@dataclass
class Scripted:
    """One scripted answer to a redact request."""

    status: int = 200
    body: dict[str, Any] | None = None
    delay: float = 0.0


@dataclass
class RedactRequest:
    """A redact request as the homeserver received it."""

    raw_path: str
    room_id: str
    event_id: str
    txn_id: str
    token: str
    body: dict[str, Any]
    status: int = 0


@dataclass
class FakeClientAPI:
    """A homeserver's Client-Server API, as far as the moderator uses it."""

    tokens: dict[str, str] = field(default_factory=dict)  # access token -> user ID
    script: list[Scripted] = field(default_factory=list)  # consumed one per redact
    whoami_failures: int = 0  # answer this many whoami calls with 500 first
    whoami_calls: int = 0
    requests: list[RedactRequest] = field(default_factory=list)
    # (token, txn ID) -> the redaction event ID: what the homeserver actually did.
    redactions: dict[tuple[str, str], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        token = headers.get("authorization", "").removeprefix("Bearer ")
        raw_path = scope["raw_path"].decode()
        status, answer, delay = self._route(scope["method"], raw_path, token, body)
        if delay:
            await asyncio.sleep(delay)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})

    def _route(
        self, method: str, raw_path: str, token: str, body: bytes
    ) -> tuple[int, dict[str, Any], float]:
        parts = raw_path.split("/")
        if method == "GET" and raw_path == "/_matrix/client/v3/account/whoami":
            with self.lock:
                self.whoami_calls += 1
                if self.whoami_calls <= self.whoami_failures:
                    return 500, {"errcode": "M_UNKNOWN", "error": "starting up"}, 0.0
            if token not in self.tokens:
                return 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "unknown token"}, 0.0
            return 200, {"user_id": self.tokens[token], "device_id": "WARDEN"}, 0.0
        # /_matrix/client/v3/rooms/{room}/redact/{event}/{txn}
        if method == "PUT" and len(parts) == 9 and parts[4] == "rooms" and parts[6] == "redact":
            request = RedactRequest(
                raw_path=raw_path,
                room_id=unquote(parts[5]),
                event_id=unquote(parts[7]),
                txn_id=unquote(parts[8]),
                token=token,
                body=orjson.loads(body or b"{}"),
            )
            with self.lock:
                self.requests.append(request)
                scripted = self.script.pop(0) if self.script else Scripted()
                request.status = scripted.status
                if token not in self.tokens:
                    request.status = 401
                    return 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "unknown token"}, 0.0
                if scripted.status != 200:
                    answer = scripted.body or {"errcode": "M_UNKNOWN", "error": "scripted"}
                    return scripted.status, answer, scripted.delay
                # A homeserver acts on the request first, then answers (maybe slowly).
                key = (token, request.txn_id)
                if key not in self.redactions:
                    self.redactions[key] = f"$redaction{len(self.redactions)}"
                return 200, {"event_id": self.redactions[key]}, scripted.delay
        return 404, {"errcode": "M_UNRECOGNIZED", "error": "not here"}, 0.0


LocalHTTPServer = ThreadedServer


@pytest.fixture
def fake_client_api() -> FakeClientAPI:
    """A fresh ``FakeClientAPI`` (not yet listening)."""
    return FakeClientAPI()


@pytest.fixture
def http_server() -> Iterator[Callable[[Any], Awaitable[LocalHTTPServer]]]:
    """Start ASGI apps on loopback: ``await http_server(app)``; stopped after the test."""
    started: list[LocalHTTPServer] = []

    async def start(app: Any) -> LocalHTTPServer:
        entry = await start_threaded(app)
        started.append(entry)
        return entry

    yield start
    stop_all(started)


@pytest.fixture
async def verdicts_js(nats_client: NATS) -> Any:
    """A JetStream context with the verdicts stream in place."""
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    return js

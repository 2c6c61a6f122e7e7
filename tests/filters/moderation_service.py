"""A real local OpenAI-compatible moderation server for tests (``POST /v1/moderations``).

It answers as the test tells it: a result, an error status (whose body quotes the API
key, as OpenAI's "Incorrect API key" answer does), a body that is not a result, or nothing
until the test releases it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tests.filters.filter_helpers import ROOM
from tests.local_servers import ThreadedServer, start_threaded, stop_all
from warden.settings import Settings

API_KEY = "sk-test-0123456789-very-secret"
MODEL = "local-safeguard-1"
OTHER_ROOM = "!elsewhere:example.org"
ROOMS_ENV = {"PS_OPENAI_FILTER_ALLOWED_ROOM_IDS": ROOM}


@dataclass
class Moderations:
    """What the test server answers, and what it received."""

    flagged: bool = False
    categories: dict[str, bool] = field(default_factory=dict)
    status: int = 200
    raw_body: bytes | None = None  # sent instead of a result when set
    hold: threading.Event | None = None  # answer only once set
    received: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    held: int = 0  # requests waiting on ``hold`` now

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append((scope["raw_path"].decode(), headers, orjson.loads(body)))
        if self.hold is not None:
            self.held += 1
            await asyncio.to_thread(self.hold.wait)
            self.held -= 1
        if self.raw_body is not None:
            payload = self.raw_body
        elif self.status != 200:
            # An error that quotes the key, as OpenAI's "Incorrect API key" does.
            payload = orjson.dumps({"error": {"message": f"bad key {API_KEY}"}})
        else:
            payload = orjson.dumps(
                {
                    "id": "modr-1",
                    "model": MODEL,
                    "results": [{"flagged": self.flagged, "categories": self.categories}],
                }
            )
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture
async def service() -> AsyncIterator[tuple[Moderations, ThreadedServer]]:
    moderations = Moderations()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await moderations.app(scope, receive, send)  # a plain function: ASGI 3 to uvicorn

    server = await start_threaded(app)
    try:
        yield moderations, server
    finally:
        if moderations.hold is not None:
            moderations.hold.set()
        stop_all([server])


def settings_for(server: ThreadedServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_filter_api_key": API_KEY,
        "openai_filter_base_url": f"{server.base_url}/v1",
        "openai_filter_model": MODEL,
        "openai_filter_allowed_networks": ["127.0.0.1/32"],
        "openai_filter_timeout_seconds": 10.0,
    }
    values.update(overrides)
    return Settings(**values)

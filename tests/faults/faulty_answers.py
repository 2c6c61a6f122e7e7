"""An ASGI wrapper that makes a local HTTP party (the homeserver's client API, the webhook
target) misbehave on demand, and records what each request got.

Modes:

* ``normal``: the wrapped app answers;
* ``delay``: the app acts, then the answer is held ``delay_seconds`` (longer than the
  services' HTTP timeout): the side effect happened but the caller never learns it, so
  it must retry without doing it twice (transaction ID, idempotency key);
* ``drop``: the request is refused with 503 before the app sees it (an overloaded
  server shedding load): nothing happened, the caller must retry until it does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MODES = ("normal", "delay", "drop")


@dataclass
class Exchange:
    """One request: when, its path and headers, the mode it met and the app's status."""

    at: float
    method: str
    path: str
    headers: dict[str, str]
    mode: str
    status: int = 0

    @property
    def clean(self) -> bool:
        """Answered by the app with a 2xx, in time: the caller saw the success."""
        return self.mode == "normal" and 200 <= self.status < 300


@dataclass
class FaultyAnswers:
    """Wraps ``app``; ``mode`` may be changed at any time from another thread."""

    app: Any
    mode: str = "normal"
    delay_seconds: float = 4.0
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        mode = self.mode
        exchange = Exchange(
            time.monotonic(), scope["method"], scope["raw_path"].decode(), headers, mode
        )
        with self.lock:
            self.exchanges.append(exchange)
        if mode == "drop":
            exchange.status = 503
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"errcode":"M_UNKNOWN"}'})
            return

        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                exchange.status = int(message["status"])
                if mode == "delay":
                    await asyncio.sleep(self.delay_seconds)
            await send(message)

        await self.app(scope, receive, recording_send)

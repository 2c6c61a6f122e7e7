"""The background image load of the ``text_fast_classifier`` and ``text_slow_classifier``
windows.

Image messages, each with media of its own (so each one is a fresh HMA scan), asked for
over ``/sign`` by a fixed number of concurrent senders in the bench process while the
load generator drives text events. Every request is built and signed before the window;
the senders only send them and note when each answer came and its status. With a
``period``, a sender starts a request at most once per period (it waits out the rest
after an answer), so both windows put the same image load on the machine whether HMA
answers at once or after a delay shorter than the period.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.events import SIGN_PATH


@dataclass(frozen=True)
class SignedRequest:
    """One pre-built ``/sign`` request: its body and its X-Matrix header."""

    body: bytes
    authorization: str


@dataclass
class Answer:
    """When one request was sent and answered (monotonic seconds) and its status
    (``error`` for a connection failure or no answer)."""

    sent: float
    answered: float
    status: str


@dataclass
class ImageLoad:
    """``concurrency`` senders going through ``requests`` in turn until stopped or the
    requests run out; each sender waits for its answer before sending the next."""

    gateway_urls: Sequence[str]
    requests: Sequence[SignedRequest]
    concurrency: int
    period_seconds: float = 0.0
    timeout_seconds: float = 30.0
    answers: list[Answer] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _next: Any = None
    _client: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Start the senders (in the running event loop)."""
        self._next = iter(enumerate(self.requests))
        self._client = httpx.AsyncClient(timeout=self.timeout_seconds)
        urls = itertools.cycle(self.gateway_urls)
        self._tasks = [
            asyncio.create_task(self._sender(f"{next(urls)}{SIGN_PATH}"))
            for _ in range(self.concurrency)
        ]

    async def _sender(self, url: str) -> None:
        assert self._client is not None
        while not self._stopping.is_set():
            item = next(self._next, None)
            if item is None:
                return
            _, request = item
            sent = time.monotonic()
            status = "error"
            with contextlib.suppress(httpx.HTTPError):
                r = await self._client.post(
                    url,
                    content=request.body,
                    headers={
                        "Authorization": request.authorization,
                        "Content-Type": "application/json",
                    },
                )
                status = str(r.status_code)
            answered = time.monotonic()
            self.answers.append(Answer(sent, answered, status))
            rest = sent + self.period_seconds - answered
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), rest)

    async def stop(self, grace_seconds: float) -> None:
        """Send nothing more; wait up to ``grace_seconds`` for the requests in flight
        (then cancel them), and close the client."""
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def report(self, window_start: float, window_end: float) -> dict[str, Any]:
        """The answers: all of them, and those that came while the window ran."""

        def statuses(answers: list[Answer]) -> dict[str, int]:
            out: dict[str, int] = {}
            for a in answers:
                out[a.status] = out.get(a.status, 0) + 1
            return dict(sorted(out.items()))

        during = [a for a in self.answers if window_start <= a.answered <= window_end]
        latencies = sorted(1000 * (a.answered - a.sent) for a in self.answers)
        return {
            "image_senders": self.concurrency,
            "image_period_s": self.period_seconds,
            "image_requests": len(self.answers),
            "image_statuses": statuses(self.answers),
            "image_requests_during_window": len(during),
            "image_latency_ms": {
                "50": round(latencies[len(latencies) // 2], 1) if latencies else None,
                "max": round(latencies[-1], 1) if latencies else None,
            },
        }

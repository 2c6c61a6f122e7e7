"""A bounded request/reply service in the filter workers' NATS queue group.

The text checks and the homeserver's antispam checks answer requests the same way: each
message is answered by a task of its own, at most ``max_in_flight`` at once (the next
message waits for a slot, so NATS buffers rather than the worker's memory), and a stop
drains the subscription and answers what is in flight.
"""

from __future__ import annotations

import abc
import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from warden.bus.subjects import FILTER_WORKERS_QUEUE

logger = logging.getLogger(__name__)


class QueueResponder(abc.ABC):
    """Subclasses implement ``_answer(msg)``; ``start``/``stop`` do the rest."""

    what = "requests"  # for log lines

    def __init__(self, max_in_flight: int) -> None:
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None

    async def subscribe(self, nc: NATS, subject: str) -> None:
        """Join the workers' queue group on ``subject``."""
        self._subscription = await nc.subscribe(
            subject, queue=FILTER_WORKERS_QUEUE, cb=self._on_message
        )

    async def stop(self) -> None:
        """Stop taking requests and answer those in flight."""
        if self._subscription is not None:
            try:
                await self._subscription.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # closing anyway
                logger.warning(
                    "draining a subscription failed", extra={"what": self.what, "error": str(exc)}
                )
            self._subscription = None
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_message(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    @abc.abstractmethod
    async def _answer(self, msg: Msg) -> None:
        """Answer one request (never raises)."""

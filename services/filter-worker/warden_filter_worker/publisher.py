"""Publishing first-time verdicts to JetStream for the moderator and webhooks.

``Nats-Msg-Id`` is the event ID, so JetStream drops a duplicate (a retried publish
whose first attempt did land). A failed publish is retried with backoff for a bounded
time, less than the stream's duplicate window so that retries stay deduplicated.

The evaluation service publishes in the background, after replying (``publish_later``):
the verdict is already committed as an unpublished outbox row, so a publication that is
lost, given up or never attempted (too many pending) is published later by the outbox
sweeper. Background work is bounded: at most ``max_in_flight`` publishes awaiting their
acknowledgement, ``max_backlog`` waiting for one of those, ``max_retrying`` retry loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from nats.js import JetStreamContext
from opentelemetry import context as otel_context

from warden.bus.streams import DUPLICATE_WINDOW_SECONDS
from warden.bus.subjects import verdict_subject
from warden.policy.verdict import Verdict
from warden.telemetry.tracing import inject_headers
from warden_filter_worker.metrics import VERDICT_PUBLISH_DEFERRED, VERDICT_PUBLISH_FAILURES

logger = logging.getLogger(__name__)

ACK_TIMEOUT_SECONDS = 2.0

# A verdict, its JSON (None: serialise it when sending) and the trace context to carry.
_Pending = tuple[Verdict, bytes | None, otel_context.Context | None]


class VerdictPublisher:
    """Publishes verdicts; retries in the background; waits for background work on close."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        retry_budget_seconds: float = DUPLICATE_WINDOW_SECONDS / 2,
        on_published: Callable[[str], None] | None = None,
        max_in_flight: int = 64,
        max_backlog: int = 10_000,
        max_retrying: int = 1_000,
    ) -> None:
        self._js = js
        self._budget = retry_budget_seconds
        self._retries: set[asyncio.Task[None]] = set()
        self._senders: set[asyncio.Task[None]] = set()
        # Senders still taking from the backlog: counted down by each sender as it stops
        # looking, so an item appended after that gets a new sender.
        self._sending = 0
        # Publications taken by ``publish_later`` whose first attempt has not finished.
        self._unfinished = 0
        self._backlog: deque[_Pending] = deque()
        self._max_in_flight = max_in_flight
        self._max_backlog = max_backlog
        self._max_retrying = max_retrying
        # Told each event ID whose message JetStream acknowledged (the outbox marker).
        self._on_published = on_published

    @property
    def pending(self) -> int:
        """Background publications whose first attempt has not finished yet."""
        return self._unfinished

    def publish_later(
        self,
        verdict: Verdict,
        data: bytes | None = None,
        trace_context: otel_context.Context | None = None,
    ) -> None:
        """Publish in the background (``data``: the verdict's JSON, if already made).

        Never waits. Past the backlog bound the publication is left to the outbox sweeper.
        """
        if len(self._backlog) >= self._max_backlog:
            VERDICT_PUBLISH_DEFERRED.inc()
            logger.warning(
                "too many verdicts waiting to be published; the outbox sweeper will publish it",
                extra={"event_id": verdict.event_id},
            )
            return
        self._backlog.append((verdict, data, trace_context))
        self._unfinished += 1
        if self._sending < self._max_in_flight:
            self._sending += 1
            task = asyncio.create_task(self._send_backlog())
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)

    async def publish(self, verdict: Verdict, data: bytes | None = None) -> bool:
        """Publish once now; on failure keep retrying in the background. True if acked."""
        if await self.publish_now(verdict, data):
            return True
        if len(self._retries) >= self._max_retrying:
            VERDICT_PUBLISH_FAILURES.labels("true").inc()
            logger.error(
                "too many verdict publishes being retried; the outbox sweeper will publish it",
                extra={"event_id": verdict.event_id},
            )
            return False
        task = asyncio.create_task(self._retry(verdict, data))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return False

    async def publish_now(self, verdict: Verdict, data: bytes | None = None) -> bool:
        """One attempt, no background retry (the outbox sweeper's own loop retries)."""
        ok = await self._attempt(verdict, data)
        if ok and self._on_published is not None:
            self._on_published(verdict.event_id)
        return ok

    async def _send_backlog(self) -> None:
        try:
            while self._backlog:
                verdict, data, trace_context = self._backlog.popleft()
                # The message carries the trace of the request that produced the verdict.
                token = None if trace_context is None else otel_context.attach(trace_context)
                try:
                    await self.publish(verdict, data)
                finally:
                    self._unfinished -= 1
                    if token is not None:
                        otel_context.detach(token)
        finally:
            self._sending -= 1

    async def _attempt(self, verdict: Verdict, data: bytes | None) -> bool:
        headers = inject_headers({"Nats-Msg-Id": verdict.event_id})
        try:
            await self._js.publish(
                verdict_subject(verdict.content_class.label),
                verdict.to_json() if data is None else data,
                timeout=ACK_TIMEOUT_SECONDS,
                headers=headers,
            )
        except Exception as exc:  # any NATS failure: retry later
            VERDICT_PUBLISH_FAILURES.labels("false").inc()
            logger.warning(
                "verdict publish failed",
                extra={"event_id": verdict.event_id, "error": f"{type(exc).__name__}: {exc}"},
            )
            return False
        return True

    async def _retry(self, verdict: Verdict, data: bytes | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        delay = 0.1
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            if await self.publish_now(verdict, data):
                return
            delay = min(delay * 2, 5.0)
        VERDICT_PUBLISH_FAILURES.labels("true").inc()
        logger.error(
            "verdict not published yet; the outbox sweeper will publish it",
            extra={"event_id": verdict.event_id},
        )

    async def close(self) -> None:
        """Send the backlog, wait for retries to finish (the caller bounds the wait)."""
        # Senders may start retries, so wait for them first.
        while self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        if self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)

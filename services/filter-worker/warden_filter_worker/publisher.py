"""Publishing first-time verdicts to JetStream for the moderator and webhooks.

``Nats-Msg-Id`` is the event ID, so JetStream drops a duplicate (a retried publish
whose first attempt did land). A failed publish is retried with backoff for a bounded
time, less than the stream's duplicate window so that retries stay deduplicated.

The evaluation service publishes in the background, after replying (``publish_later``):
the verdict is already committed as an unpublished outbox row, so a publication that is
lost, given up or never attempted (too many pending) is published later by the outbox
sweeper. The background publications are sent in windows of up to ``max_in_flight``
messages whose acknowledgements are awaited together (``AckedPublisher``): one wait and
one timeout per window rather than a NATS request per verdict. Each verdict is reported
to ``on_published`` (the outbox marker) only once JetStream acknowledged it; one that is
not acknowledged in time is counted as failed and retried like any other. Background work
is bounded: one window of ``max_in_flight`` awaiting acknowledgement, ``max_backlog``
waiting for the next window, ``max_retrying`` retry loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from nats.aio.client import Client as NATS
from opentelemetry import context as otel_context

from warden.bus.jetstream_publish import AckedPublisher, PendingAck
from warden.bus.streams import DUPLICATE_WINDOW_SECONDS
from warden.bus.subjects import VERDICT_SUBJECT_PREFIX
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
        nc: NATS,
        *,
        retry_budget_seconds: float = DUPLICATE_WINDOW_SECONDS / 2,
        on_published: Callable[[str], None] | None = None,
        max_in_flight: int = 256,
        max_backlog: int = 10_000,
        max_retrying: int = 1_000,
        ack_timeout_seconds: float = ACK_TIMEOUT_SECONDS,
        subject_prefix: str = VERDICT_SUBJECT_PREFIX,
    ) -> None:
        self._js = nc.jetstream()
        self._acked = AckedPublisher(nc)
        self._budget = retry_budget_seconds
        self._ack_timeout = ack_timeout_seconds
        self._subject_prefix = subject_prefix  # ``verdict_subject``'s (tests use their own)
        self._retries: set[asyncio.Task[None]] = set()
        # The one task sending the backlog, window after window; None when idle.
        self._sender: asyncio.Task[None] | None = None
        # Publications taken by ``publish_later`` whose first attempt has not finished.
        self._unfinished = 0
        self._backlog: deque[_Pending] = deque()
        self._max_in_flight = max_in_flight
        self._max_backlog = max_backlog
        self._max_retrying = max_retrying
        # Told each event ID whose message JetStream acknowledged (the outbox marker).
        self._on_published = on_published
        # Counters for tests and logs: windows sent and their messages acknowledged.
        self.windows = 0
        self.acknowledged = 0

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
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_backlog())

    async def publish(self, verdict: Verdict, data: bytes | None = None) -> bool:
        """Publish once now; on failure keep retrying in the background. True if acked."""
        if await self.publish_now(verdict, data):
            return True
        self._retry_later(verdict, data)
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
                size = min(len(self._backlog), self._max_in_flight)
                window = [self._backlog.popleft() for _ in range(size)]
                try:
                    await self._send_window(window)
                except Exception:  # a bug; these verdicts are left to the outbox sweeper
                    logger.exception("sending verdicts failed")
                finally:
                    self._unfinished -= size
        finally:
            # Nothing awaits between the loop's last check and here, so a publication
            # appended after it finds no sender and starts one.
            self._sender = None

    async def _send_window(self, window: list[_Pending]) -> None:
        """Send every message of the window, then await their acknowledgements at once."""
        self.windows += 1
        sent: list[tuple[_Pending, PendingAck]] = []
        for item in window:
            verdict, data, trace_context = item
            # The message carries the trace of the request that produced the verdict.
            token = None if trace_context is None else otel_context.attach(trace_context)
            try:
                headers = inject_headers({"Nats-Msg-Id": verdict.event_id})
            finally:
                if token is not None:
                    otel_context.detach(token)
            try:
                pending = await self._acked.publish(
                    self._subject_prefix + verdict.content_class.label,
                    verdict.to_json() if data is None else data,
                    headers,
                )
            except Exception as exc:  # any NATS failure: retry later
                self._failed(item, exc)
                continue
            sent.append((item, pending))
        if not sent:
            return
        try:
            await asyncio.wait([p.future for _, p in sent], timeout=self._ack_timeout)
        finally:
            for _, pending in sent:
                if not pending.future.done():
                    self._acked.give_up(pending)  # cancels it: counted as failed below
        for item, pending in sent:
            future = pending.future
            if future.cancelled():
                self._failed(item, TimeoutError("no acknowledgement in time"))
            elif (error := future.exception()) is not None:
                self._failed(item, error)
            else:
                self.acknowledged += 1
                if self._on_published is not None:
                    self._on_published(item[0].event_id)

    def _failed(self, item: _Pending, exc: BaseException) -> None:
        verdict, data, trace_context = item
        VERDICT_PUBLISH_FAILURES.labels("false").inc()
        logger.warning(
            "verdict publish failed",
            extra={"event_id": verdict.event_id, "error": f"{type(exc).__name__}: {exc}"},
        )
        # The retry task copies the current context: its messages carry the trace too.
        token = None if trace_context is None else otel_context.attach(trace_context)
        try:
            self._retry_later(verdict, data)
        finally:
            if token is not None:
                otel_context.detach(token)

    def _retry_later(self, verdict: Verdict, data: bytes | None) -> None:
        if len(self._retries) >= self._max_retrying:
            VERDICT_PUBLISH_FAILURES.labels("true").inc()
            logger.error(
                "too many verdict publishes being retried; the outbox sweeper will publish it",
                extra={"event_id": verdict.event_id},
            )
            return
        task = asyncio.create_task(self._retry(verdict, data))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _attempt(self, verdict: Verdict, data: bytes | None) -> bool:
        headers = inject_headers({"Nats-Msg-Id": verdict.event_id})
        try:
            await self._js.publish(
                self._subject_prefix + verdict.content_class.label,
                verdict.to_json() if data is None else data,
                timeout=self._ack_timeout,
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
        # The sender may start retries, so wait for it first.
        while self._sender is not None and not self._sender.done():
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)

"""Publishing first-time verdicts to JetStream for the moderator and webhooks.

``Nats-Msg-Id`` is the event ID, so JetStream drops a duplicate (a retried publish
whose first attempt did land). A failed publish is retried with backoff for a bounded
time, less than the stream's duplicate window so that retries stay deduplicated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.js import JetStreamContext

from warden.bus.streams import DUPLICATE_WINDOW_SECONDS
from warden.bus.subjects import verdict_subject
from warden.policy.verdict import Verdict
from warden.telemetry.tracing import inject_headers
from warden_filter_worker.metrics import VERDICT_PUBLISH_FAILURES

logger = logging.getLogger(__name__)

ACK_TIMEOUT_SECONDS = 2.0


class VerdictPublisher:
    """Publishes verdicts; retries in the background; waits for retries on close."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        retry_budget_seconds: float = DUPLICATE_WINDOW_SECONDS / 2,
        on_published: Callable[[str], None] | None = None,
    ) -> None:
        self._js = js
        self._budget = retry_budget_seconds
        self._retries: set[asyncio.Task[None]] = set()
        # Told each event ID whose message JetStream acknowledged (the outbox marker).
        self._on_published = on_published

    async def publish(self, verdict: Verdict) -> bool:
        """Publish once now; on failure keep retrying in the background. True if acked."""
        if await self.publish_now(verdict):
            return True
        task = asyncio.create_task(self._retry(verdict))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return False

    async def publish_now(self, verdict: Verdict) -> bool:
        """One attempt, no background retry (the outbox sweeper's own loop retries)."""
        ok = await self._attempt(verdict)
        if ok and self._on_published is not None:
            self._on_published(verdict.event_id)
        return ok

    async def _attempt(self, verdict: Verdict) -> bool:
        headers = inject_headers({"Nats-Msg-Id": verdict.event_id})
        try:
            await self._js.publish(
                verdict_subject(verdict.content_class.label),
                verdict.to_json(),
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

    async def _retry(self, verdict: Verdict) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        delay = 0.1
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            if await self.publish_now(verdict):
                return
            delay = min(delay * 2, 5.0)
        VERDICT_PUBLISH_FAILURES.labels("true").inc()
        logger.error(
            "verdict not published yet; the outbox sweeper will publish it",
            extra={"event_id": verdict.event_id},
        )

    async def close(self) -> None:
        """Wait for background retries to finish (the caller bounds the wait)."""
        if self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)

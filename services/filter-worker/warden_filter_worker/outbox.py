"""Making sure every committed verdict reaches JetStream, even across a crash.

A verdict row is committed unpublished. After JetStream acknowledges the message, the
``PublishedMarker`` records it (batched: one UPDATE per interval, not per verdict). If
the worker dies in between, the row stays unpublished and the ``OutboxSweeper`` of any
worker publishes it later. The sweeper claims a batch in one short statement (a lease
column, taken with ``FOR UPDATE SKIP LOCKED`` so sweepers on several workers share the
work), then publishes with no transaction open and no pooled connection held: publishes
may be slow (up to the publish timeout each when NATS is down). A sweeper that dies
mid-batch leaves its rows to others once the lease lapses. A message published twice (a
crash after the ack but before the mark) is dropped by JetStream within its duplicate
window; past it, the moderator and webhooks are idempotent per event ID.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from warden.policy.verdict import Verdict
from warden.storage.database import DATABASE_ERRORS
from warden.storage.verdicts import (
    claim_unpublished,
    mark_published,
    outbox_backlog,
    release_unpublished,
)
from warden_filter_worker.metrics import OUTBOX_OLDEST_AGE, OUTBOX_UNPUBLISHED

logger = logging.getLogger(__name__)

Publish = Callable[[Verdict], Awaitable[bool]]


class PublishedMarker:
    """Collects event IDs whose messages were acknowledged; marks them in batches."""

    def __init__(self, pool: asyncpg.Pool, *, interval_seconds: float = 0.25) -> None:
        self._pool = pool
        self._interval = interval_seconds
        self._pending: list[str] = []

    def add(self, event_id: str) -> None:
        """Queue an event ID to be marked published."""
        self._pending.append(event_id)

    async def flush(self) -> None:
        """Mark everything queued so far (a failure keeps them queued)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await mark_published(self._pool, batch)
        except DATABASE_ERRORS as exc:
            self._pending.extend(batch)
            logger.warning("could not mark verdicts published", extra={"error": str(exc)})

    async def run(self) -> None:
        """Flush every interval until cancelled (then flush once more)."""
        try:
            while True:
                await asyncio.sleep(self._interval)
                await self.flush()
        finally:
            await asyncio.shield(self.flush())


class OutboxSweeper:
    """Publishes verdicts whose first publication was lost."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publish: Publish,
        *,
        interval_seconds: float,
        min_age_seconds: float,
        batch_size: int = 200,
        lease_seconds: float = 900.0,
    ) -> None:
        self._pool = pool
        self._publish = publish
        self._interval = interval_seconds
        self._min_age_ms = int(min_age_seconds * 1000)
        self._batch = batch_size
        # Longer than a whole batch of publishes can take (200 x a 2 s timeout), so a
        # live sweeper's rows are not published by another one meanwhile.
        self._lease_ms = int(lease_seconds * 1000)

    async def sweep_once(self) -> int:
        """Publish one batch of old unpublished verdicts; return how many were published."""
        older_than = int(time.time() * 1000) - self._min_age_ms
        stale = await claim_unpublished(
            self._pool, older_than_ts=older_than, limit=self._batch, lease_ms=self._lease_ms
        )
        done: list[str] = []
        try:
            for verdict in stale:
                if await self._publish(verdict):
                    done.append(verdict.event_id)
        finally:
            await mark_published(self._pool, done)
            failed = {v.event_id for v in stale} - set(done)
            await release_unpublished(self._pool, sorted(failed))
        if done:
            logger.info("republished lost verdict messages", extra={"count": len(done)})
        return len(done)

    async def measure_backlog(self) -> int:
        """Set the outbox backlog gauges from the table; return the count."""
        count, oldest_ts = await outbox_backlog(self._pool)
        OUTBOX_UNPUBLISHED.set(count)
        age = 0.0 if oldest_ts is None else max(0.0, time.time() - oldest_ts / 1000)
        OUTBOX_OLDEST_AGE.set(age)
        return count

    async def run(self) -> None:
        """Sweep every interval until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                while await self.sweep_once() >= self._batch:
                    pass  # a backlog: keep going without waiting
                await self.measure_backlog()
            except DATABASE_ERRORS as exc:
                logger.warning("outbox sweep failed", extra={"error": str(exc)})

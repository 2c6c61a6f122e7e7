"""Sending queued moderation commands: one federation transaction per destination.

Each destination (a moderation bot's server) is independent: a loop finds the ones
due (something queued, not backing off, not claimed), and up to
``PS_MODERATION_COMMAND_CONCURRENCY`` are drained at once. Draining one claims it
(``storage.moderation_commands.claim``: one sender at a time across replicas), sends
``PUT /_matrix/federation/v1/send/{txnId}`` with up to 100 EDUs through the federation
client (X-Matrix, the network guard), and on a 2xx answer drops those EDUs and takes
the next batch. A failure keeps the transaction (same ID, same EDUs) for the next
attempt, after ``base * 2**(failures-1)`` seconds capped at the maximum, so a
destination that is down costs one request per backoff and never delays the others.

Everything lives in PostgreSQL, so a restart resumes where the last process stopped:
a claim of a process that died runs out after its lease, and the transaction it was
sending is sent again under its ID. Commands older than the retention are dropped
unsent, counted as ``expired``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
import urllib.parse

import asyncpg
import orjson

from warden.bus.consumer import backoff_delay
from warden.federation.client import FederationClient
from warden.federation.errors import FederationError, TemporaryFederationError
from warden.settings import Settings
from warden.storage import moderation_commands as queue
from warden.storage.database import DATABASE_ERRORS
from warden_moderator.metrics import (
    MODERATION_COMMAND_DESTINATIONS,
    MODERATION_COMMAND_SEND_SECONDS,
    MODERATION_COMMAND_TRANSACTIONS,
    MODERATION_COMMANDS,
    MODERATION_COMMANDS_QUEUED,
)

logger = logging.getLogger(__name__)

# The spec's limit of EDUs in one federation transaction.
MAX_EDUS_PER_TRANSACTION = 100
SEND_PATH = "/_matrix/federation/v1/send/"


def _now_ms() -> int:
    return int(time.time() * 1000)


class CommandSender:
    """Delivers the queue to every destination until stopped."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        federation: FederationClient,
        settings: Settings,
        *,
        batch: int = MAX_EDUS_PER_TRANSACTION,
    ) -> None:
        self._pool = pool
        self._federation = federation
        self._origin = str(settings.server_name)
        self._batch = batch
        self._concurrency = settings.moderation_command_concurrency
        self._poll = settings.moderation_command_poll_seconds
        self._retention_ms = int(settings.moderation_command_retention_hours * 3_600_000)
        self._backoff_base = settings.moderation_command_backoff_base_seconds
        self._backoff_max = settings.moderation_command_backoff_max_seconds
        self._timeout = settings.federation_timeout_seconds
        # Outlives the request's whole time budget and the database writes after it; only
        # a sender that died holds a claim longer (then the same transaction is resent).
        self._lease_ms = int((self._timeout + max(5.0, self._timeout)) * 1000)
        self._owner = f"{secrets.token_hex(6)}"
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last_sweep = 0.0

    def wake(self) -> None:
        """Look for work now (a command was just queued)."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Send until ``stopping``; transactions in flight then finish or are retried later."""
        stopper = asyncio.create_task(stopping.wait())
        try:
            while not stopping.is_set():
                self._wake.clear()
                timeout = self._poll
                try:
                    await self._sweep_if_due()
                    await self._start_due()
                    timeout = await self._until_next()
                except DATABASE_ERRORS as exc:
                    logger.warning(
                        "moderation commands: database unavailable",
                        extra={"event": "moderation_command_sender", "error": str(exc)[:200]},
                    )
                except Exception:
                    # As a failed send (``_drain``): a bug here must not end the moderator's
                    # redactions with it; the loop tries again after the poll interval.
                    logger.exception(
                        "moderation commands: unexpected error; trying again",
                        extra={"event": "moderation_command_sender"},
                    )
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    [waker, stopper, *self._tasks.values()],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waker.cancel()
        finally:
            stopper.cancel()
            await self._finish()

    async def _finish(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks.values()), timeout=self._timeout)
        for task in pending:
            # Its claim runs out and the same transaction is sent again later.
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _start_due(self) -> None:
        free = self._concurrency - len(self._tasks)
        if free <= 0:
            return
        due = await queue.due_destinations(self._pool, _now_ms(), free + len(self._tasks))
        for destination in due:
            if destination in self._tasks or len(self._tasks) >= self._concurrency:
                continue
            task = asyncio.create_task(self._drain(destination))
            self._tasks[destination] = task
            task.add_done_callback(functools.partial(self._forget, destination))

    def _forget(self, destination: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(destination, None)

    async def _until_next(self) -> float:
        """Seconds to sleep: the poll interval, or less when a backoff ends sooner."""
        now = _now_ms()
        soonest = await queue.next_attempt_at(self._pool, now)
        if soonest is None:
            return self._poll
        return max(0.05, min(self._poll, (soonest - now) / 1000))

    async def _sweep_if_due(self) -> None:
        """Apply the retention and refresh the gauges, at most once per poll interval."""
        if time.monotonic() - self._last_sweep < self._poll:
            return
        self._last_sweep = time.monotonic()
        now = _now_ms()
        expired = await queue.expire(self._pool, cutoff_ms=now - self._retention_ms, now_ms=now)
        if expired:
            MODERATION_COMMANDS.labels("expired").inc(expired)
            logger.warning(
                "moderation commands expired unsent",
                extra={"event": "moderation_command", "outcome": "expired", "count": expired},
            )
        await self.refresh_gauges()

    async def refresh_gauges(self) -> None:
        """Set the destination-state and queue-size gauges from the database."""
        states, queued = await queue.destination_states(self._pool, _now_ms())
        for state, count in states.items():
            MODERATION_COMMAND_DESTINATIONS.labels(state).set(count)
        MODERATION_COMMANDS_QUEUED.set(queued)

    async def _drain(self, destination: str) -> None:
        """Send transactions to ``destination`` until its queue is empty or one fails."""
        try:
            while True:
                claim = await queue.claim(
                    self._pool,
                    destination,
                    owner=self._owner,
                    now_ms=_now_ms(),
                    lease_ms=self._lease_ms,
                    batch=self._batch,
                )
                if claim is None or not await self._send(claim):
                    return
        except DATABASE_ERRORS as exc:
            # Any claim taken runs out; the transaction is kept for the next attempt.
            logger.warning(
                "moderation commands: database error while sending",
                extra={
                    "event": "moderation_command_sender",
                    "destination": destination,
                    "error": str(exc)[:200],
                },
            )
        except Exception:
            # A bug must not stop the other destinations; this one is tried again later.
            logger.exception(
                "moderation commands: unexpected error while sending",
                extra={"event": "moderation_command_sender", "destination": destination},
            )

    async def _send(self, claim: queue.Claim) -> bool:
        """Send one transaction; record the result. True when it was accepted."""
        body = {
            "origin": self._origin,
            "origin_server_ts": _now_ms(),
            "pdus": [],
            "edus": [orjson.loads(edu) for edu in claim.edus],
        }
        path = SEND_PATH + urllib.parse.quote(claim.txn_id, safe="")
        fields = {
            "event": "moderation_command_transaction",
            "destination": claim.destination,
            "txn_id": claim.txn_id,
            "edus": len(claim.edus),
            "retry": claim.retry,
        }
        started = time.perf_counter()
        try:
            await self._federation.put_json(claim.destination, path, body, timeout=self._timeout)
        except FederationError as exc:
            MODERATION_COMMAND_SEND_SECONDS.observe(time.perf_counter() - started)
            outcome = (
                "temporary_error"
                if isinstance(exc, TemporaryFederationError)
                else "permanent_error"
            )
            MODERATION_COMMAND_TRANSACTIONS.labels(outcome).inc()
            delay = backoff_delay(claim.failures + 1, self._backoff_base, self._backoff_max)
            await queue.fail(
                self._pool,
                claim.destination,
                owner=self._owner,
                next_attempt_ts=_now_ms() + int(delay * 1000),
                error=f"{type(exc).__name__}: {exc}",
            )
            logger.warning(
                "moderation command transaction failed",
                extra={**fields, "outcome": outcome, "error": str(exc)[:200], "retry_in": delay},
            )
            return False
        MODERATION_COMMAND_SEND_SECONDS.observe(time.perf_counter() - started)
        MODERATION_COMMAND_TRANSACTIONS.labels("ok").inc()
        sent = await queue.complete(
            self._pool,
            claim.destination,
            owner=self._owner,
            txn_id=claim.txn_id,
            now_ms=_now_ms(),
        )
        MODERATION_COMMANDS.labels("sent").inc(sent)
        logger.info("moderation command transaction sent", extra={**fields, "outcome": "ok"})
        return sent > 0

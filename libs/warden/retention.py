"""Retention: pruning old rows, in batches, by one process at a time (issue 15).

A *pass* prunes, in order: verdict details older than ``PS_RETENTION_VERDICT_DETAILS_DAYS``,
minimal verdicts older than ``PS_RETENTION_VERDICTS_DAYS`` (0, the default, keeps them
forever), final webhook deliveries and moderation actions older than
``PS_RETENTION_DELIVERIES_DAYS``, and the learned state of rooms Warden left, once it is
``PS_RETENTION_LEFT_ROOMS_DAYS`` old, and media scan results (``media_hashes``,
``media_classifications``) older than ``PS_RETENTION_MEDIA_DAYS``. What each step keeps
is described in
``warden.storage.retention``. A period of 0 turns its step off.

Each statement changes at most ``PS_RETENTION_BATCH_SIZE`` rows (short row locks, small
WAL bursts, no long transaction), and the pass sleeps ``PS_RETENTION_BATCH_PAUSE_MS``
between statements so that replication and autovacuum keep up with a large backlog.

One pass at a time across all processes: the pass holds the Redis lock
``retention_lock`` (SET NX with a random token and a lease, renewed after each batch,
deleted at the end). A process that finds it taken does not prune; one that loses it
mid-pass (its lease ran out, another took over) stops after its current batch. Filter
workers run a pass when the last complete one (``retention_last_run``) is
``PS_RETENTION_INTERVAL_MINUTES`` old; ``warden prune`` runs one pass at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from warden import redis_keys
from warden.settings import Settings
from warden.storage import retention as store
from warden.storage.database import DATABASE_ERRORS

logger = logging.getLogger(__name__)

# What stops ``warden prune`` with one line instead of a traceback.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, aioredis.RedisError)

PRUNED_ROWS = Counter(
    "warden_retention_pruned_rows_total",
    "Rows pruned by retention, by table and kind (details: cleared; deleted).",
    ["table", "kind"],
)
RUN_SECONDS = Histogram(
    "warden_retention_run_seconds",
    "Duration of complete retention passes.",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400),
)
LAST_RUN = Gauge(
    "warden_retention_last_run_timestamp_seconds",
    "When this process last completed a retention pass (Unix time; 0: never).",
)

DAY_MS = 86_400_000
# The lock's lease; renewed after every batch, so only a stuck statement outlives it.
LOCK_LEASE_MS = 120_000
# How often a filter worker looks whether a pass is due.
MAX_POLL_SECONDS = 60.0

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

_jitter = random.SystemRandom()


@dataclass(frozen=True)
class RetentionPolicy:
    """The periods (ms; 0 keeps forever) and batching of a pass."""

    verdict_details_ms: int = 90 * DAY_MS
    verdicts_ms: int = 0
    deliveries_ms: int = 30 * DAY_MS
    left_rooms_ms: int = 7 * DAY_MS
    media_ms: int = 30 * DAY_MS
    batch_size: int = 1000
    batch_pause_seconds: float = 0.1

    @classmethod
    def from_settings(cls, s: Settings) -> RetentionPolicy:
        """The ``PS_RETENTION_*`` settings."""
        return cls(
            verdict_details_ms=int(s.retention_verdict_details_days * DAY_MS),
            verdicts_ms=int(s.retention_verdicts_days * DAY_MS),
            deliveries_ms=int(s.retention_deliveries_days * DAY_MS),
            left_rooms_ms=int(s.retention_left_rooms_days * DAY_MS),
            media_ms=int(s.retention_media_days * DAY_MS),
            batch_size=s.retention_batch_size,
            batch_pause_seconds=s.retention_batch_pause_ms / 1000,
        )


@dataclass
class PassResult:
    """What one pass did: rows per (table, kind), and whether it ran to the end."""

    rows: dict[tuple[str, str], int] = field(default_factory=dict)
    statements: int = 0
    complete: bool = True

    def add(self, table: str, kind: str, n: int) -> None:
        """Count ``n`` rows (and their metric)."""
        self.statements += 1
        if n:
            self.rows[table, kind] = self.rows.get((table, kind), 0) + n
            PRUNED_ROWS.labels(table, kind).inc(n)


class _Interrupted(Exception):
    """The pass stops early: the lock was lost, or the process is stopping."""


class Pruner:
    """Runs retention passes for one process."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        policy: RetentionPolicy,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._policy = policy
        self._clock_ms = clock_ms
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def run_pass(self, stopping: asyncio.Event | None = None) -> PassResult | None:
        """Take the lock and prune once; None when another process holds the lock.

        The pass stops after the current batch when ``stopping`` is set or the lock is
        lost; it is then not complete, and the next one starts over.
        """
        key = redis_keys.retention_lock()
        token = secrets.token_hex(16)
        if not await self._redis.set(key, token, nx=True, px=LOCK_LEASE_MS):
            return None
        started = time.monotonic()
        result = PassResult()

        async def renewed() -> None:
            if not await self._renew(keys=[key], args=[token, LOCK_LEASE_MS]):
                logger.warning("retention lock lost", extra={"event": "retention_lock_lost"})
                raise _Interrupted
            if stopping is not None and stopping.is_set():
                raise _Interrupted

        try:
            await self._prune(result, renewed)
        except _Interrupted:
            result.complete = False
        finally:
            with contextlib.suppress(Exception):  # it expires anyway
                await self._release(keys=[key], args=[token])
        if result.complete:
            now_ms = self._clock_ms()
            await self._redis.set(redis_keys.retention_last_run(), now_ms)
            RUN_SECONDS.observe(time.monotonic() - started)
            LAST_RUN.set(now_ms / 1000)
        logger.info(
            "retention pass",
            extra={
                "event": "retention_pass",
                "complete": result.complete,
                "rows": {f"{t}.{k}": n for (t, k), n in sorted(result.rows.items())},
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return result

    async def _batches(
        self,
        result: PassResult,
        table: str,
        kind: str,
        statement: Callable[[], Awaitable[int]],
        renewed: Callable[[], Awaitable[None]],
    ) -> None:
        """Run ``statement`` until it changes fewer rows than a batch."""
        limit = self._policy.batch_size
        while True:
            n = await statement()
            result.add(table, kind, n)
            await renewed()
            if n < limit:
                return
            await asyncio.sleep(self._policy.batch_pause_seconds)

    async def _prune(self, result: PassResult, renewed: Callable[[], Awaitable[None]]) -> None:
        p = self._policy
        pool = self._pool
        limit = p.batch_size
        now = self._clock_ms()
        if p.verdict_details_ms:
            cutoff = now - p.verdict_details_ms
            await self._batches(
                result,
                "verdicts",
                "details",
                lambda: store.prune_verdict_details(pool, before_ts=cutoff, limit=limit),
                renewed,
            )
        if p.verdicts_ms:
            cutoff_v = now - p.verdicts_ms
            await self._batches(
                result,
                "verdicts",
                "deleted",
                lambda: store.delete_verdicts(pool, before_ts=cutoff_v, limit=limit),
                renewed,
            )
        if p.deliveries_ms:
            cutoff_d = now - p.deliveries_ms
            for table in store.FINAL_STATUSES:
                await self._batches(
                    result,
                    table,
                    "deleted",
                    functools.partial(
                        store.delete_final_deliveries, pool, table, before_ts=cutoff_d, limit=limit
                    ),
                    renewed,
                )
        if p.left_rooms_ms:
            await self._prune_left_rooms(result, now - p.left_rooms_ms, renewed)
        if p.media_ms:
            cutoff_m = now - p.media_ms
            for table in store.MEDIA_TABLES:
                await self._batches(
                    result,
                    table,
                    "deleted",
                    functools.partial(
                        store.delete_old_media, pool, table, before_ts=cutoff_m, limit=limit
                    ),
                    renewed,
                )

    async def _prune_left_rooms(
        self, result: PassResult, cutoff: int, renewed: Callable[[], Awaitable[None]]
    ) -> None:
        pool = self._pool
        limit = self._policy.batch_size
        after = (-1, "")
        while True:
            found = await store.left_rooms(pool, before_ts=cutoff, limit=limit, after=after)
            result.statements += 1
            if not found:
                return
            after = found[-1]
            room_ids = [room_id for _, room_id in found]
            for table in store.LEARNED_STATE_TABLES:
                await self._batches(
                    result,
                    table,
                    "deleted",
                    functools.partial(
                        store.delete_learned_rows,
                        pool,
                        table,
                        room_ids,
                        before_ts=cutoff,
                        limit=limit,
                    ),
                    renewed,
                )
            result.add(
                "room_state",
                "deleted",
                await store.finish_left_rooms(pool, room_ids, before_ts=cutoff),
            )
            await renewed()
            if len(room_ids) < limit:
                return
            await asyncio.sleep(self._policy.batch_pause_seconds)

    async def due(self, interval_ms: int) -> bool:
        """Whether the last complete pass (by any process) is ``interval_ms`` old."""
        last = await self._redis.get(redis_keys.retention_last_run())
        return last is None or self._clock_ms() - int(last) >= interval_ms

    async def run(self, stopping: asyncio.Event, interval_seconds: float) -> None:
        """A filter worker's task: prune whenever a pass is due, until ``stopping``."""
        poll = min(interval_seconds, MAX_POLL_SECONDS)
        # Workers started together do not all race for the lock at once.
        delay = _jitter.uniform(0, poll)
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return
            try:
                if await self.due(int(interval_seconds * 1000)):
                    await self.run_pass(stopping)
            except Exception:  # PostgreSQL or Redis hiccup: try again at the next poll
                logger.exception("retention pass failed", extra={"event": "retention_failed"})
            delay = poll * _jitter.uniform(0.9, 1.1)


def run_command(settings: Settings) -> int:
    """``warden prune``: one pass now (for cron or a Kubernetes CronJob).

    Prints the rows pruned per table and kind. Exit 0 when the pass completed or another
    process holds the lock (a pass is running: nothing to do), 1 when PostgreSQL or
    Redis failed or the lock was lost mid-pass.
    """

    from warden.runtime.dependencies import redis_client
    from warden.storage.database import create_pool

    async def go() -> int:
        # One statement at a time: two connections are plenty.
        small = settings.model_copy(
            update={"database_max_open_conns": 2, "database_max_idle_conns": 1}
        )
        pool = await create_pool(small)
        client = redis_client(settings)
        try:
            pruner = Pruner(pool=pool, redis=client, policy=RetentionPolicy.from_settings(settings))
            result = await pruner.run_pass()
        finally:
            await client.aclose()
            await pool.close()
        if result is None:
            print("warden prune: another process is pruning; nothing done", file=sys.stderr)
            return 0
        for (table, kind), n in sorted(result.rows.items()):
            print(f"{table} {kind}: {n}")
        print(f"pruned {sum(result.rows.values())} rows in {result.statements} statements")
        if not result.complete:
            print("warden prune: the lock was lost; the pass stopped early", file=sys.stderr)
            return 1
        return 0

    try:
        return asyncio.run(go())
    except _UNAVAILABLE as exc:
        print(f"warden prune: {exc}", file=sys.stderr)
        return 1

"""Per-origin rate limits of the gateway (the policy API, ``/send``), shared by every replica.

Fixed-window counters in Redis: the key ``redis_keys.rate_limit(origin, window, budget)``
names the origin, the budget and the window's index (``now // window_seconds``). Fixed
windows allow a burst of up to twice the limit across a window boundary; that is
acceptable for a limit whose purpose is to stop one server from starving the others.

The check itself does no I/O. Each replica counts locally and adds its counts to Redis
in one round trip per ``sync_interval`` (one Lua call for every origin it has seen in
the current window), learning the totals of all replicas in the same reply. A request is refused
when the last known total plus this replica's unsynced count exceeds the limit. Asking
Redis for every request cost about a tenth of the gateway's CPU per ``/sign``
(``make bench``); the price is precision: replicas learn of each other's traffic up to
one interval late, so an origin can overshoot the limit by what it sends to the other
replicas within one interval.

One limiter can keep several budgets per origin (``bucket``): the policy API charges an
origin's questions about its own users' events and about other servers' events to
separate budgets (see ``policy_api``).

The check runs after X-Matrix authentication, so a request with a spoofed origin never
spends the real origin's budget.

When Redis cannot be reached the limit does not fail open: the sync error is counted
(``errors``) and logged, the unshared counts are kept and added at the next sync that
works, and each replica goes on limiting with what it counts itself (an in-process
fallback: an origin spreading its requests over N replicas may then get up to N times
the limit until Redis answers again; ``warden_redis_fallbacks_total{use="rate_limit"}``
counts the syncs done without Redis). After a failed sync the background syncs skip
Redis for 1 s (``warden.runtime.redis_outage``) rather than each paying a failed
attempt, then try again: a Redis that came back is used without a restart. Refusing
every server because the shared count cannot be read would be worse; letting everyone
through would make the limit vanish exactly when the gateway is busiest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from warden import redis_keys
from warden.matrix.errors import LimitExceeded
from warden.runtime.redis_outage import RedisOutage, is_redis_outage
from warden_gateway.metrics import RATE_LIMIT_ERRORS

logger = logging.getLogger(__name__)

DEFAULT_SYNC_INTERVAL_SECONDS = 0.05

# KEYS: one counter per origin and window; ARGV[1]: expiry (ms); ARGV[i + 1]: what to add
# to KEYS[i]. Returns each counter's new total.
_ADD_COUNTS = """
local totals = {}
for i, key in ipairs(KEYS) do
    local n = redis.call('INCRBY', key, ARGV[i + 1])
    if n == tonumber(ARGV[i + 1]) then redis.call('PEXPIRE', key, ARGV[1]) end
    totals[i] = n
end
return totals
"""


@dataclass(slots=True)
class _Count:
    window: int
    known: int = 0  # every replica's total, as of this replica's last sync
    unsynced: int = 0  # counted here since then


class OriginRateLimiter:
    """At most ``limit`` units per origin (and bucket) per ``window_seconds`` window (0:
    no limit).

    ``budget`` names the Redis keys (``redis_keys.rate_limit``), ``what`` is what the
    429 message says is limited, ``errors`` counts syncs Redis did not answer.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        limit: int,
        window_seconds: int,
        *,
        budget: str = "sign",
        what: str = "policy requests",
        errors: Counter = RATE_LIMIT_ERRORS,
        clock: Callable[[], float] = time.time,
        sync_interval: float = DEFAULT_SYNC_INTERVAL_SECONDS,
    ) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self._budget = budget
        self._what = what
        self._errors = errors
        self._clock = clock
        self._sync_interval = sync_interval
        self._add_counts = redis.register_script(_ADD_COUNTS)
        # Two windows: a replica whose clock lags a little still finds the key.
        self._expiry_ms = window_seconds * 2000
        self._counts: dict[tuple[str, str], _Count] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._redis_outage = RedisOutage("rate_limit")

    def check(self, origin: str, cost: int = 1, bucket: str = "") -> None:
        """Count ``cost`` units from ``origin``; raise ``LimitExceeded`` past the limit.

        The error carries ``retry_after_ms``: the time left in the current window.
        """
        if self.limit <= 0:
            return
        now = self._clock()
        window = int(now // self.window_seconds)
        key = (origin, bucket)
        count = self._counts.get(key)
        if count is None or count.window != window:
            count = self._counts[key] = _Count(window)
        count.unsynced += cost
        self._schedule_sync()
        if count.known + count.unsynced > self.limit:
            raise self._exceeded(origin, window, now)

    def refund(self, origin: str, cost: int = 1, bucket: str = "") -> None:
        """Give back ``cost`` units charged in the current window (a request that turned
        out to be free); shared with the other replicas at the next sync."""
        if self.limit <= 0:
            return
        window = int(self._clock() // self.window_seconds)
        count = self._counts.get((origin, bucket))
        if count is not None and count.window == window:
            count.unsynced -= cost

    def _exceeded(self, origin: str, window: int, now: float) -> LimitExceeded:
        retry_after_ms = max(1, int(((window + 1) * self.window_seconds - now) * 1000))
        return LimitExceeded(
            f"Too many {self._what} from {origin}: at most {self.limit} per "
            f"{self.window_seconds} s",
            retry_after_ms=retry_after_ms,
        )

    def _schedule_sync(self) -> None:
        if self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(
                self._sync_later(), name="rate-limit-sync"
            )

    async def _sync_later(self) -> None:
        try:
            await asyncio.sleep(self._sync_interval)
        finally:
            # Whatever is counted from now on schedules the next sync.
            self._sync_task = None
        if self._redis_outage.skipping:
            # Redis failed a moment ago: the counts stay here (unsynced) and limit locally.
            self._redis_outage.fell_back()
            return
        await self.sync()

    def _key(self, origin: str, bucket: str, window: int) -> str:
        budget = f"{self._budget}_{bucket}" if bucket else self._budget
        return redis_keys.rate_limit(origin, window, budget)

    async def sync(self) -> None:
        """Add this replica's unsynced counts to Redis and learn every replica's totals."""
        current = int(self._clock() // self.window_seconds)
        # Counts of windows that are over are of no more use (an origin's next request
        # starts a new window).
        self._counts = {k: c for k, c in self._counts.items() if c.window >= current}
        # Origins with nothing new are asked too (adding 0): their totals still move
        # with the other replicas' traffic.
        batch = [(key, c.window, c.unsynced) for key, c in self._counts.items()]
        if not batch:
            return
        for key, _, _ in batch:
            self._counts[key].unsynced = 0
        try:
            totals = await self._add_counts(
                keys=[self._key(o, b, window) for (o, b), window, _ in batch],
                args=[self._expiry_ms, *(n for _, _, n in batch)],
            )
        except (RedisError, OSError) as exc:
            self._errors.inc()
            if is_redis_outage(exc):
                self._redis_outage.failed(exc)
            self._redis_outage.fell_back()
            logger.warning(
                "rate limit counts not shared: Redis unavailable; limiting locally",
                extra={"budget": self._budget, "origins": len(batch), "error": str(exc)},
            )
            # Keep the counts: they go on limiting here and are shared at the next
            # sync that works.
            for key, window, n in batch:
                count = self._counts.get(key)
                if count is not None and count.window == window:
                    count.unsynced += n
            return
        self._redis_outage.answered()
        for (key, window, _), total in zip(batch, totals, strict=True):
            count = self._counts.get(key)
            if count is not None and count.window == window:
                count.known = int(total)

    async def aclose(self) -> None:
        """Share what is still unsynced and stop."""
        task, self._sync_task = self._sync_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.sync()

"""Where the hellban filters keep bans: Redis, shared by every worker; and, while Redis
cannot be reached, this worker's memory.

Without a fallback a Redis outage would leave every new event without a verdict (both
hellban filters are on by default, and fail secure), so ``/sign`` would answer 503 for
the whole outage. Instead, while Redis is down (``RedisOutage("hellban")``: after a
failure Redis is skipped for a second, then tried again):

- the prefilter refuses only senders this worker banned itself meanwhile (a ban another
  worker set, or one Redis held before the outage, is not seen: the sender's events are
  judged on their content alone until Redis answers);
- the postfilter bans in this worker's memory, for the configured minutes.

Bans kept in memory still count once Redis is back, until they expire (they are not
copied to Redis). They are bounded (``MAX_LOCAL_BANS``, oldest dropped first). Each
operation done without Redis counts in ``warden_redis_fallbacks_total{use="hellban"}``.
"""

from __future__ import annotations

import asyncio
import time

from warden import redis_keys
from warden.runtime.redis_outage import RedisOutage, is_redis_outage, server_of
from warden.storage.redis_autopipeline import RedisAutoPipeline

# One entry per banned sender and community: about 200 bytes each.
MAX_LOCAL_BANS = 100_000
# How long a ban is waited for in Redis before going on without it: Redis answers in
# well under a millisecond, and a connection attempt retried with backoff (a Redis just
# gone) would otherwise outlast the filter's timeout and fail the evaluation.
REDIS_WAIT_SECONDS = 0.5


class HellbanStore:
    """Hellbans by community and sender, in Redis or, while it is down, in process."""

    def __init__(self, auto_pipeline: RedisAutoPipeline) -> None:
        self._redis = auto_pipeline
        # Shares the worker's view of its Redis: after the claims fail, no wait here.
        self.outage = RedisOutage("hellban", server=server_of(auto_pipeline.redis))
        # Redis key -> monotonic expiry, oldest first (insertion order).
        self._local: dict[str, float] = {}

    def banned_here(self, community_id: str, sender: str) -> bool:
        """Whether this worker banned the sender while Redis was down (still running)."""
        if not self._local:
            return False
        key = redis_keys.hellban(community_id, sender)
        until = self._local.get(key)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._local[key]
            return False
        return True

    async def banned(self, community_id: str, sender: str) -> bool:
        """Whether the sender serves a hellban (Redis, else this worker's bans)."""
        if self.banned_here(community_id, sender):
            return True
        if not self.outage.skipping:
            try:
                async with asyncio.timeout(REDIS_WAIT_SECONDS):
                    found = await self._redis.execute_command(
                        "EXISTS", redis_keys.hellban(community_id, sender)
                    )
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self.outage.failed(exc)
            else:
                self.outage.answered()
                return bool(found)
        self.outage.fell_back()
        return False

    async def ban(self, community_id: str, sender: str, seconds: int) -> None:
        """Ban the sender for ``seconds`` unless already banned (never extended)."""
        key = redis_keys.hellban(community_id, sender)
        if not self.outage.skipping:
            try:
                async with asyncio.timeout(REDIS_WAIT_SECONDS):
                    await self._redis.execute_command("SET", key, b"1", "NX", "EX", seconds)
            except Exception as exc:
                if not is_redis_outage(exc):
                    raise
                self.outage.failed(exc)
            else:
                self.outage.answered()
                return
        self.outage.fell_back()
        now = time.monotonic()
        until = self._local.pop(key, None)
        if until is not None and until > now:
            self._local[key] = until  # still banned: not extended
            return
        if len(self._local) >= MAX_LOCAL_BANS:
            del self._local[next(iter(self._local))]
        self._local[key] = now + seconds

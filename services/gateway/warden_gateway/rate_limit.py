"""The per-origin rate limit on the policy API, shared by every gateway replica.

A fixed-window counter in Redis: the key ``redis_keys.rate_limit(origin, window)``
names the origin and the window's index (``now // window_seconds``), and one Lua
script increments it and sets its expiry in a single round trip. Fixed windows allow a
burst of up to twice the limit across a window boundary; that is acceptable for a
limit whose purpose is to stop one server from starving the others, and it keeps the
check to one ``INCR``.

The check runs after X-Matrix authentication, so a request with a spoofed origin never
spends the real origin's budget. When Redis cannot be reached the request is let
through (and counted in ``warden_sign_rate_limit_errors_total``): refusing every
server's events because a protective limit cannot be checked would be worse.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from warden import redis_keys
from warden.matrix.errors import LimitExceeded
from warden_gateway.metrics import RATE_LIMIT_ERRORS

logger = logging.getLogger(__name__)

_INCREMENT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class OriginRateLimiter:
    """At most ``limit`` requests per origin per ``window_seconds`` window (0: no limit)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        limit: int,
        window_seconds: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock
        self._increment = redis.register_script(_INCREMENT)
        # Two windows: a replica whose clock lags a little still finds the key.
        self._expiry_ms = window_seconds * 2000

    async def check(self, origin: str) -> None:
        """Count one request from ``origin``; raise ``LimitExceeded`` past the limit.

        The error carries ``retry_after_ms``: the time left in the current window.
        """
        if self.limit <= 0:
            return
        now = self._clock()
        window = int(now // self.window_seconds)
        key = redis_keys.rate_limit(origin, window)
        try:
            count = int(await self._increment(keys=[key], args=[self._expiry_ms]))
        except (RedisError, OSError) as exc:
            RATE_LIMIT_ERRORS.inc()
            logger.warning(
                "rate limit not checked: Redis unavailable",
                extra={"origin": origin, "error": str(exc)},
            )
            return
        if count > self.limit:
            retry_after_ms = max(1, int(((window + 1) * self.window_seconds - now) * 1000))
            raise LimitExceeded(
                f"Too many policy requests from {origin}: at most {self.limit} per "
                f"{self.window_seconds} s",
                retry_after_ms=retry_after_ms,
            )

"""Going on without Redis: what counts as Redis being down, a short skip after a failure,
and a count of the fallbacks.

Redis holds state that is shared but never the record: cached verdicts and evaluation
claims (the record is PostgreSQL's ``verdicts`` table), rate-limit counts and key caches.
When it cannot be reached each user falls back to PostgreSQL or to what the process
keeps itself, and says so in ``warden_redis_fallbacks_total{use}``:

- ``claims``: the filter worker judges without Redis claims; PostgreSQL decides
  (``warden_filter_worker.evaluation``);
- ``rate_limit``: each gateway replica limits with its own counts
  (``warden_gateway.rate_limit``);
- ``key_cache``: the keyring reads keys from PostgreSQL and keeps negative lookups in
  process (``warden.federation.keyring``);
- ``send_dedup``: ``/send`` transactions are handled without deduplication
  (``warden_gateway.federation_inbound``; harmless, JetStream drops repeated PDUs).

``RedisOutage`` remembers the last failure: for ``retry_seconds`` after it, callers skip
Redis at once instead of each paying a failed attempt (up to the socket timeouts when
the server is paused or packets are dropped). The first call after that tries Redis
again, so a Redis that came back is used again without a restart (redis-py reconnects
its pooled connections by itself). While Redis answers, the check is one comparison.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Counter
from redis.exceptions import RedisError

from warden.policy.dependency_failures import is_dependency_failure

logger = logging.getLogger(__name__)

REDIS_FALLBACKS = Counter(
    "warden_redis_fallbacks_total",
    "Operations done without Redis because it could not be reached (or was skipped for "
    "a moment after a failure), by use: claims (verdicts judged with PostgreSQL alone), "
    "rate_limit (counts kept in process), key_cache (keys from PostgreSQL, negative "
    "lookups kept in process), send_dedup (/send transactions not deduplicated).",
    ["use"],
)

DEFAULT_RETRY_SECONDS = 1.0


def is_redis_outage(exc: BaseException) -> bool:
    """True when ``exc`` says Redis could not serve us now (not a bad command)."""
    return isinstance(exc, RedisError | OSError | TimeoutError) and is_dependency_failure(exc)


class RedisOutage:
    """Whether to skip Redis for now, for one use; counts that use's fallbacks."""

    def __init__(
        self,
        use: str,
        *,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.use = use
        self._fallbacks = REDIS_FALLBACKS.labels(use)
        self._retry = retry_seconds
        self._clock = clock
        self._until = 0.0  # skip Redis until then (monotonic seconds); 0: Redis answered
        self._down = False

    @property
    def skipping(self) -> bool:
        """True for ``retry_seconds`` after a failure: go without Redis at once."""
        return self._until != 0.0 and self._clock() < self._until

    @property
    def down(self) -> bool:
        """True from a failure until Redis next answers."""
        return self._down

    def failed(self, exc: BaseException) -> None:
        """Redis failed: skip it for a while (logged once per outage)."""
        self._until = self._clock() + self._retry
        if not self._down:
            self._down = True
            logger.warning(
                "Redis unavailable; going on without it",
                extra={"use": self.use, "error": f"{type(exc).__name__}: {exc}"},
            )

    def answered(self) -> None:
        """Redis answered: use it again (logged when it ends an outage)."""
        if self._down:
            self._down = False
            self._until = 0.0
            logger.info("Redis answers again", extra={"use": self.use})

    def fell_back(self, count: int = 1) -> None:
        """Count ``count`` operations done without Redis."""
        self._fallbacks.inc(count)

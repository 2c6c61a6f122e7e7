"""Throttling of failed admin API authentications, per client address (review M11).

A client address (IPv6: its /64) that fails ``PS_ADMIN_AUTH_FAILURES_PER_MINUTE`` times
within a minute of its first failure gets 429 ``M_LIMIT_EXCEEDED`` (with
``retry_after_ms`` and ``Retry-After``) for every admin request until that minute is
over, without its key being compared: guessing the key costs a minute per few tries.
A right key from a throttled address waits too. Counted per gateway process; the table
is bounded (``MAX_CLIENTS``), oldest entries going first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter

from warden.matrix.errors import LimitExceeded
from warden.runtime.client_penalties import client_bucket

ADMIN_AUTH_FAILURES = Counter(
    "warden_admin_auth_failures_total",
    "Admin API requests refused for their credentials, by outcome: refused (401, wrong or "
    "missing key) or throttled (429, too many failures from the client address).",
    ["outcome"],
)

WINDOW_SECONDS = 60.0
MAX_CLIENTS = 10_000


class AdminAuthThrottle:
    """Failed authentications per client address in a one-minute window."""

    def __init__(
        self,
        failures_per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        metric: Counter = ADMIN_AUTH_FAILURES,
    ) -> None:
        """``metric`` counts failures by outcome (``refused``, ``throttled``): the
        server-centric API passes its own."""
        self._limit = failures_per_minute
        self._refused = metric.labels("refused")
        self._throttled = metric.labels("throttled")
        self._clock = clock
        self._failures: dict[str, tuple[float, int]] = {}  # bucket -> (window start, count)

    def check(self, client: str | None) -> None:
        """Raise ``LimitExceeded`` if ``client`` used up its failures for now."""
        entry = self._failures.get(client_bucket(client or "unknown"))
        if entry is None:
            return
        start, count = entry
        left = start + WINDOW_SECONDS - self._clock()
        if left > 0 and count >= self._limit:
            self._throttled.inc()
            raise LimitExceeded(
                "Too many failed authentications from this address; retry later",
                retry_after_ms=max(1, int(left * 1000)),
            )

    def failed(self, client: str | None) -> None:
        """Count one failed authentication of ``client``."""
        self._refused.inc()
        bucket = client_bucket(client or "unknown")
        now = self._clock()
        entry = self._failures.pop(bucket, None)
        if entry is None or entry[0] + WINDOW_SECONDS <= now:
            entry = (now, 0)
        self._failures[bucket] = (entry[0], entry[1] + 1)  # re-inserted: newest last
        if len(self._failures) > MAX_CLIENTS:
            self._failures.pop(next(iter(self._failures)))

"""X-Matrix verifications remembered briefly, for requests repeated byte for byte.

An X-Matrix signature covers the method, the request target, the origin, the
destination and the body, and nothing else, and ed25519 signatures are deterministic: a
server that asks again for the same event sends a byte-identical ``Authorization``
header. continuwuity retries ``/sign`` up to five times, honouring ``Retry-After``, and
any server may retry after a 503 or a 429. Verifying such a repeat gives the answer the
first verification gave, for the price of a header parse and an ed25519 verification
(about a third of a repeat's CPU in the gateway). So a request whose method, request
target, ``Authorization`` headers and body digest are those of a request verified in the
last ``TTL_SECONDS`` is taken to come from the origin that verification found.

Only successful verifications are remembered, so a request that failed is verified (and
penalised) again every time, and an outsider cannot add entries without valid
signatures. The memory is bounded: ``DEFAULT_SIZE`` entries, the oldest dropped first,
each its key's strings and digest (about half a kilobyte). The TTL also bounds how long
a request signed with a key its server has since withdrawn (a rotation, an expired
``valid_until_ts``) goes on being accepted: a retry within seconds, not a replay hours
later. Counted in ``warden_sign_xmatrix_cache_total{result}``, the entries held in
``warden_sign_xmatrix_cache_entries``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from warden.matrix.ids import ServerName
from warden_gateway.metrics import XMATRIX_CACHE, XMATRIX_CACHE_ENTRIES

DEFAULT_SIZE = 10_000
TTL_SECONDS = 30.0

# Bound once: ``labels()`` takes a lock and builds a key on every call.
_HIT = XMATRIX_CACHE.labels("hit")
_MISS = XMATRIX_CACHE.labels("miss")

# method, request target, the Authorization headers in order, the body's SHA-256.
RequestKey = tuple[str, str, tuple[str, ...], bytes]


def request_key(
    method: str, target: str, authorization: Sequence[str], body_digest: bytes
) -> RequestKey:
    """What an X-Matrix verification of a request depends on, besides the keys."""
    return (method, target, tuple(authorization), body_digest)


class VerifiedRequests:
    """A bounded, expiring memory of requests whose X-Matrix signature was verified.

    Entries are plain tuples of strings, bytes and a float, which the garbage collector
    does not track.
    """

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        ttl_seconds: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._size = size
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[RequestKey, tuple[ServerName, float]] = OrderedDict()

    def origin(self, key: RequestKey) -> ServerName | None:
        """The origin verified for this request in the last TTL, if any (hit or miss)."""
        entry = self._entries.get(key)
        if entry is None:
            _MISS.inc()
            return None
        origin, expires = entry
        if self._clock() >= expires:
            del self._entries[key]
            _MISS.inc()
            return None
        _HIT.inc()
        return origin

    def remember(self, key: RequestKey, origin: ServerName) -> None:
        """Remember a request whose X-Matrix signature verified, as from ``origin``."""
        if self._size <= 0:
            return
        self._entries[key] = (origin, self._clock() + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        XMATRIX_CACHE_ENTRIES.set(len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

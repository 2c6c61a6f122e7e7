"""Client addresses that keep failing federation authentication, refused for a while.

Requests that fail X-Matrix authentication (or are refused as unreadable before any
authentication) cost an outsider nothing to make and the gateway a parse, a response
and a connection's upkeep each. A homeserver makes such a request now and then (a key
being rotated, a clock that drifted); one address making ``PS_HTTP_AUTH_FAILURE_LIMIT``
of them within ``WINDOW_SECONDS`` is not a homeserver having a bad moment, so for
``PS_HTTP_AUTH_FAILURE_PENALTY_SECONDS`` after that:

* its new connections are answered 429 ``M_LIMIT_EXCEEDED`` with ``Retry-After`` and
  closed as they open (``http_limits``), before any request is read;
* its open connections are closed after their current response;
* on Linux, its packets are dropped by the kernel at the gateway's listening sockets
  (``kernel_refusal``), so its connection attempts cost nothing at all.

Addresses are counted as the per-client budgets count them (``client_bucket``: IPv6
per /64). The table is bounded (``max_clients``): when it is full, the oldest entry no
longer counting or penalised makes room, and otherwise a newcomer is not counted (so
filling the table with many addresses buys an attacker only today's cost per request).
Counted in ``warden_http_rejected_total{reason="penalised"}``; addresses counted in
``warden_http_auth_failure_clients``, those under a penalty in
``warden_http_penalised_clients``.

Only direct connections are counted and refused: a connection from a trusted reverse
proxy (``FORWARDED_ALLOW_IPS``) carries many clients' requests, and refusing their
requests by the ``X-Forwarded-For`` address would let one attacker shut out everyone
behind a proxy that does not set it (or fill the table with addresses it makes up). The
HTTP front marks each request of a direct connection with its peer's address
(``PEER_SCOPE_KEY``); ``failed_request`` counts only those. Behind a proxy, limit failed
requests at the proxy.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Gauge

from warden.settings import Settings

# Failures are counted over windows of this length, from each address's first failure.
WINDOW_SECONDS = 10.0

# The ASGI scope key under which the HTTP front puts the peer address of a request that
# came on a direct connection (absent for a trusted proxy's connections).
PEER_SCOPE_KEY = "warden.penalisable_peer"

HTTP_AUTH_FAILURE_CLIENTS = Gauge(
    "warden_http_auth_failure_clients",
    "Client addresses (IPv6: /64 prefixes) whose failed federation authentications are "
    "being counted (bounded; as of the last change).",
)
HTTP_PENALISED_CLIENTS = Gauge(
    "warden_http_penalised_clients",
    "Client addresses (IPv6: /64 prefixes) refused for failing federation authentication "
    "more than PS_HTTP_AUTH_FAILURE_LIMIT times within 10 s (as of the last change).",
)


def client_bucket(address: str) -> str:
    """The budget a client address is charged to: itself, or its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack listener
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ClientPenalties:
    """Per-address failure counts and the penalties they earn; one per process."""

    def __init__(
        self,
        limit: int,
        penalty_seconds: float,
        *,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``limit`` failures within ``WINDOW_SECONDS`` earn ``penalty_seconds`` of
        refusal; a ``limit`` of 0 turns penalties off."""
        self._limit = limit
        self._penalty = penalty_seconds
        self._max_clients = max_clients
        self._clock = clock
        # bucket -> [window start, failures in it, penalised until]; oldest first.
        self._table: dict[str, list[float]] = {}
        # Buckets under a penalty -> until when. Empty almost always: checked per request.
        self._penalised: dict[str, float] = {}
        self._on_penalty: Callable[[], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientPenalties:
        """The penalties ``PS_HTTP_AUTH_FAILURE_LIMIT`` and its penalty describe."""
        return cls(settings.http_auth_failure_limit, settings.http_auth_failure_penalty_seconds)

    def on_penalty(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` whenever a penalty starts (None: stop)."""
        self._on_penalty = callback

    def now(self) -> float:
        """The clock penalties are timed by."""
        return self._clock()

    def penalties(self) -> dict[str, float]:
        """The buckets under a penalty now, with when each penalty ends."""
        now = self._clock()
        return {bucket: until for bucket, until in self._penalised.items() if until > now}

    @property
    def active(self) -> bool:
        """Whether any address is (or was until a moment ago) under a penalty."""
        return bool(self._penalised)

    def failed_request(self, scope: Mapping[str, Any]) -> None:
        """Count one failed request, if it came on a direct connection."""
        self.failed(scope.get(PEER_SCOPE_KEY))

    def failed(self, address: str | None) -> None:
        """Count one failed request from ``address`` (None: unknown, not counted)."""
        if not self._limit or not address:
            return
        now = self._clock()
        bucket = client_bucket(address)
        entry = self._table.get(bucket)
        if entry is None or now - entry[0] >= WINDOW_SECONDS:
            if entry is not None:
                del self._table[bucket]  # re-inserted below: the table stays oldest first
            elif len(self._table) >= self._max_clients and not self._make_room(now):
                return
            entry = self._table[bucket] = [now, 0.0, entry[2] if entry is not None else 0.0]
            HTTP_AUTH_FAILURE_CLIENTS.set(len(self._table))
        entry[1] += 1
        if entry[1] >= self._limit and entry[2] <= now:
            entry[2] = now + self._penalty
            # Penalties nobody asked about again are dropped here: at most one per
            # table entry is ever kept.
            for other in [b for b, until in self._penalised.items() if until <= now]:
                del self._penalised[other]
            self._penalised[bucket] = entry[2]
            HTTP_PENALISED_CLIENTS.set(len(self._penalised))
            if self._on_penalty is not None:
                self._on_penalty()

    def penalised(self, address: str) -> float:
        """Seconds left of ``address``'s penalty (0.0: none)."""
        if not self._penalised:
            return 0.0
        bucket = client_bucket(address)
        until = self._penalised.get(bucket)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left > 0:
            return left
        del self._penalised[bucket]
        HTTP_PENALISED_CLIENTS.set(len(self._penalised))
        return 0.0

    def _make_room(self, now: float) -> bool:
        oldest = next(iter(self._table))
        window_start, _, until = self._table[oldest]
        if now - window_start < WINDOW_SECONDS or until > now:
            return False
        del self._table[oldest]
        HTTP_AUTH_FAILURE_CLIENTS.set(len(self._table))
        return True

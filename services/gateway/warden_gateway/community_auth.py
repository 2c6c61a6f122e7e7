"""Authentication of the server-centric API (``/_policyserv/v1``) by community token.

``CommunityAuth.authenticate(request)`` reads ``Authorization: Bearer <token>``, finds
the community holding the token (``warden.storage.community_tokens``: by hash, compared
in constant time) and returns it, or raises a Matrix error:

- 401 ``M_MISSING_TOKEN``: no bearer token;
- 401 ``M_UNKNOWN_TOKEN``: not a token of any community (or rotated away);
- 429 ``M_LIMIT_EXCEEDED`` (``retry_after_ms``): too many failed authentications from
  the client address (``PS_COMMUNITY_API_AUTH_FAILURES_PER_MINUTE``), or the community
  used up its requests for the minute (``PS_COMMUNITY_API_RATE_LIMIT_PER_MINUTE``,
  shared by every gateway replica through Redis);
- 503 ``M_UNKNOWN``: PostgreSQL did not answer the lookup in time.

A token found is kept in process for ``PS_COMMUNITY_TOKEN_CACHE_SECONDS`` (by its
hash, bounded by ``TOKEN_CACHE_SIZE`` entries): a homeserver's spam-checker callbacks
come at its message rate, and a PostgreSQL lookup per callback was a quarter of the
gateway's CPU for them. The admin API announces a rotation, like any change of a
community, on ``CONFIG_CHANGED_SUBJECT``; ``on_config_changed`` then drops that
community's entries, so the old token stops working at once on every replica. Unknown
tokens are never cached (an outsider cannot grow the cache). Tokens are never logged:
logs and metrics name the community only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Literal

import asyncpg
import orjson
from nats.aio.msg import Msg
from prometheus_client import Counter
from starlette.requests import Request

from warden.matrix.errors import MissingToken, UnknownToken
from warden.storage.communities import hash_access_token
from warden.storage.community_tokens import MAX_TOKEN_LENGTH, community_by_access_token
from warden.storage.database import DATABASE_ERRORS
from warden.storage.records import Community
from warden_gateway.admin_auth import AdminAuthThrottle
from warden_gateway.client_address import client_address
from warden_gateway.errors import TemporarilyUnavailable
from warden_gateway.rate_limit import OriginRateLimiter

logger = logging.getLogger(__name__)

COMMUNITY_AUTH_FAILURES = Counter(
    "warden_community_auth_failures_total",
    "Server-centric API requests refused for their token, by outcome: refused (401, "
    "missing or unknown token) or throttled (429, too many failures from the address).",
    ["outcome"],
)
COMMUNITY_API_RATE_LIMIT_ERRORS = Counter(
    "warden_community_api_rate_limit_errors_total",
    "Syncs of a per-community budget (the server-centric API's, the spam-checker "
    "callbacks') that could not reach Redis "
    "(counts kept; each replica limits on its own counts until Redis answers).",
)

COMMUNITY_TOKEN_LOOKUPS = Counter(
    "warden_community_token_lookups_total",
    "Community token authentications by where the token was found: cache (this "
    "gateway's memory) or database (PostgreSQL, then kept for "
    "PS_COMMUNITY_TOKEN_CACHE_SECONDS).",
    ["source"],
)
_FROM_CACHE = COMMUNITY_TOKEN_LOOKUPS.labels("cache")
_FROM_DATABASE = COMMUNITY_TOKEN_LOOKUPS.labels("database")

# policyserv's lookup timeout: a slow database must not hold requests open.
LOOKUP_TIMEOUT_SECONDS = 2.0
# Tokens kept per gateway: one per community in use (only found tokens are kept).
TOKEN_CACHE_SIZE = 10_000
RATE_LIMIT_BUDGET = "community_api"


class CommunityAuth:
    """Finds the community of a request's bearer token, with per-token and per-address
    bounds. One per gateway process; safe for concurrent use."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        rate_limiter: OriginRateLimiter | None,
        failures_per_minute: int,
        lookup_timeout_seconds: float = LOOKUP_TIMEOUT_SECONDS,
        cache_seconds: float = 0.0,
        cache_size: int = TOKEN_CACHE_SIZE,
    ) -> None:
        """``rate_limiter`` counts requests per community ID (the token's owner; a token
        is never used as a key); None turns the per-token limit off. ``cache_seconds``:
        how long a token found is kept (0: never)."""
        self._pool = pool
        self._limiter = rate_limiter
        self._throttle = AdminAuthThrottle(failures_per_minute, metric=COMMUNITY_AUTH_FAILURES)
        self._timeout = lookup_timeout_seconds
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        # Token hash -> (community, monotonic expiry), oldest first.
        self._cache: OrderedDict[str, tuple[Community, float]] = OrderedDict()

    def forget(self, community_id: str | None = None) -> None:
        """Drop the kept tokens of ``community_id`` (None: of every community)."""
        if community_id is None:
            self._cache.clear()
            return
        for key in [k for k, (c, _) in self._cache.items() if c.community_id == community_id]:
            del self._cache[key]

    async def on_config_changed(self, msg: Msg) -> None:
        """NATS callback for ``CONFIG_CHANGED_SUBJECT``: ``{"community_id"}`` drops that
        community's tokens (a rotation, a deletion or a changed configuration); a room
        change drops nothing; anything unreadable drops every token, which is safe."""
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("community_id"), str):
            self.forget(body["community_id"])
        elif not (isinstance(body, dict) and isinstance(body.get("room_id"), str)):
            self.forget()

    def _cached(self, token: str) -> Community | None:
        """The community of a token kept in memory and not expired, else None."""
        if self._cache_seconds <= 0 or not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        hit = self._cache.get(hash_access_token(token))
        if hit is not None and hit[1] > time.monotonic():
            _FROM_CACHE.inc()
            return hit[0]
        return None

    async def _find(self, token: str) -> Community | None:
        if self._cache_seconds <= 0 or not token or len(token) > MAX_TOKEN_LENGTH:
            return await community_by_access_token(self._pool, token)
        key = hash_access_token(token)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            _FROM_CACHE.inc()
            return hit[0]
        community = await community_by_access_token(self._pool, token)
        _FROM_DATABASE.inc()
        self._cache.pop(key, None)
        if community is not None:
            self._cache[key] = (community, now + self._cache_seconds)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return community

    async def authenticate(
        self, request: Request, *, limiter: OriginRateLimiter | Literal[False] | None = False
    ) -> Community:
        """The community whose token the request carries; raises a ``MatrixError``.

        ``limiter`` counts the request against another budget than the server-centric
        API's (None: none); the failed-authentication throttle applies either way."""
        client = client_address(request)
        self._throttle.check(client)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._throttle.failed(client)
            raise MissingToken("Missing access token (Authorization: Bearer <community token>)")
        # A token kept in memory needs no timer (asked once per message a homeserver
        # sends through the spam-checker callbacks).
        community = self._cached(token)
        try:
            if community is None:
                async with asyncio.timeout(self._timeout):
                    community = await self._find(token)
        except DATABASE_ERRORS as exc:  # TimeoutError is an OSError
            logger.warning("community token lookup failed", extra={"error": type(exc).__name__})
            raise TemporarilyUnavailable("Could not check the access token; retry") from None
        if community is None:
            self._throttle.failed(client)
            raise UnknownToken("Unknown access token")
        budget = self._limiter if limiter is False else limiter
        if budget is not None:
            budget.check(community.community_id, bucket="")
        return community

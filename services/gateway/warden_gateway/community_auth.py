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

Tokens are not cached, so a rotation takes effect on the next request, and never
logged: logs and metrics name the community only.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import Counter
from starlette.requests import Request

from warden.matrix.errors import MissingToken, UnknownToken
from warden.storage.community_tokens import community_by_access_token
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
    "Syncs of the server-centric API's per-community budget that could not reach Redis "
    "(counts kept; each replica limits on its own counts until Redis answers).",
)

# policyserv's lookup timeout: a slow database must not hold requests open.
LOOKUP_TIMEOUT_SECONDS = 2.0
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
    ) -> None:
        """``rate_limiter`` counts requests per community ID (the token's owner; a token
        is never used as a key); None turns the per-token limit off."""
        self._pool = pool
        self._limiter = rate_limiter
        self._throttle = AdminAuthThrottle(failures_per_minute, metric=COMMUNITY_AUTH_FAILURES)
        self._timeout = lookup_timeout_seconds

    async def authenticate(self, request: Request) -> Community:
        """The community whose token the request carries; raises a ``MatrixError``."""
        client = client_address(request)
        self._throttle.check(client)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._throttle.failed(client)
            raise MissingToken("Missing access token (Authorization: Bearer <community token>)")
        try:
            async with asyncio.timeout(self._timeout):
                community = await community_by_access_token(self._pool, token)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            logger.warning("community token lookup failed", extra={"error": type(exc).__name__})
            raise TemporarilyUnavailable("Could not check the access token; retry") from None
        if community is None:
            self._throttle.failed(client)
            raise UnknownToken("Unknown access token")
        if self._limiter is not None:
            self._limiter.check(community.community_id, bucket="")
        return community

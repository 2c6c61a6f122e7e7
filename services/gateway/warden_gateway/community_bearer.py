"""A minimal community bearer-token lookup for the server-centric API.

Stand-in for ``community_auth.CommunityAuth.authenticate`` (built in another branch,
with per-token rate limits), which replaces it at merge: same signature, same errors.
The token is looked up by its SHA-256 (``communities.api_access_token_hash``, indexed;
``hash_access_token``): the database compares hashes of a 256-bit secret, so the
comparison's timing tells nothing about the token.
"""

from __future__ import annotations

import asyncpg
from starlette.requests import Request

from warden.matrix.errors import MatrixError
from warden.storage.communities import get_community, hash_access_token
from warden.storage.records import Community


class MissingToken(MatrixError):
    """No ``Authorization: Bearer <token>`` header."""

    errcode = "M_MISSING_TOKEN"
    status = 401


class UnknownToken(MatrixError):
    """A bearer token no community has."""

    errcode = "M_UNKNOWN_TOKEN"
    status = 401


class CommunityBearer:
    """``authenticate(request) -> Community`` by bearer token."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def authenticate(self, request: Request) -> Community:
        """The community whose access token the request carries; raises ``MissingToken``
        or ``UnknownToken``."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise MissingToken("Missing access token: send 'Authorization: Bearer <token>'")
        community_id = await self._pool.fetchval(
            "SELECT id FROM communities WHERE api_access_token_hash = $1",
            hash_access_token(token),
        )
        community = await get_community(self._pool, community_id) if community_id else None
        if community is None:
            raise UnknownToken("Unrecognised access token")
        return community

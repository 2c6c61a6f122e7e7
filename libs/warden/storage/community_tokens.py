"""Community access tokens: issued, rotated and looked up, only ever stored as a hash.

A token is ``pst_`` (policyserv's prefix) followed by 43 URL-safe base64 characters of
256 random bits. The ``communities.api_access_token_hash`` column holds the hex SHA-256
of the token (``communities.hash_access_token``); the token itself is shown once, in
the answer to the rotation, and never written anywhere by Warden.

A lookup is one indexed equality on the hash; the row's hash is then compared with the
presented one by ``hmac.compare_digest``, so the answer's timing does not depend on how
much of a guessed hash matches. A rotation replaces the hash in one statement: the old
token stops working for the very next lookup; the admin API then tells every gateway
to drop the token it keeps (``warden_gateway.community_auth``).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

import asyncpg

from warden.storage.communities import _COLUMNS, _community, hash_access_token
from warden.storage.records import Community

TOKEN_PREFIX = "pst_"  # noqa: S105 (a prefix, not a secret)
# 32 bytes = 256 bits of randomness (policyserv's crypto/rand.Text() has 130).
TOKEN_RANDOM_BYTES = 32
# Longer presented tokens are refused without a lookup: they cannot be ours, and an
# imported policyserv token is far shorter.
MAX_TOKEN_LENGTH = 256


def new_access_token() -> str:
    """A fresh token: ``pst_`` + 256 random bits, URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


@dataclass(frozen=True)
class Rotation:
    """The outcome of a rotation: the new token (shown once) and whether one existed."""

    new_access_token: str
    had_access_token: bool


async def rotate_access_token(pool: asyncpg.Pool, community_id: str) -> Rotation | None:
    """Give the community a new token, invalidating the old one; None if unknown."""
    token = new_access_token()
    had = await pool.fetchval(
        """
        UPDATE communities AS c SET api_access_token_hash = $2
        FROM (SELECT id, api_access_token_hash AS old FROM communities WHERE id = $1
              FOR UPDATE) AS before
        WHERE c.id = before.id
        RETURNING before.old IS NOT NULL
        """,
        community_id,
        hash_access_token(token),
    )
    if had is None:
        return None
    return Rotation(token, bool(had))


async def community_by_access_token(pool: asyncpg.Pool, token: str) -> Community | None:
    """The community holding ``token``, or None (also for a malformed token)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    presented = hash_access_token(token)
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM communities WHERE api_access_token_hash = $1", presented
    )
    if row is None:
        return None
    stored = row["api_access_token_hash"]
    if not isinstance(stored, str) or not hmac.compare_digest(
        stored.encode("ascii"), presented.encode("ascii")
    ):
        return None
    return _community(row)

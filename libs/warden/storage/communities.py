"""The ``communities`` table."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from warden.storage.records import Community

_COLUMNS = "id, name, config, can_self_join_rooms, api_access_token_hash"


def _community(row: asyncpg.Record) -> Community:
    config = row["config"]
    if isinstance(config, str):  # asyncpg returns jsonb as text without a codec
        config = orjson.loads(config)
    return Community(
        community_id=row["id"],
        name=row["name"],
        config=config,
        can_self_join_rooms=row["can_self_join_rooms"],
        api_access_token_hash=row["api_access_token_hash"],
    )


def hash_access_token(token: str) -> str:
    """How a community access token is stored: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_community_id() -> str:
    """A random, unguessable ID (policyserv uses KSUIDs for the same reason).

    Never starting with ``-``: one URL-safe ID in 64 did, and a command line then reads
    it as an option (``warden admin communities show -x...`` failed). Drawing again keeps
    the other 23 characters' 138 bits.
    """
    while True:
        community_id = secrets.token_urlsafe(18)
        if not community_id.startswith("-"):
            return community_id


async def create_community(
    pool: asyncpg.Pool, name: str, *, community_id: str | None = None
) -> Community:
    """Create a community with an empty config."""
    row = await pool.fetchrow(
        f"INSERT INTO communities (id, name) VALUES ($1, $2) RETURNING {_COLUMNS}",
        community_id or new_community_id(),
        name,
    )
    assert row is not None
    return _community(row)


async def get_community(pool: asyncpg.Pool, community_id: str) -> Community | None:
    """The community, or None."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM communities WHERE id = $1", community_id)
    return _community(row) if row else None


async def update_community(
    pool: asyncpg.Pool,
    community_id: str,
    *,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    can_self_join_rooms: bool | None = None,
) -> Community | None:
    """Change the given fields (None leaves a field as it is); None if unknown."""
    row = await pool.fetchrow(
        f"""
        UPDATE communities SET
            name = COALESCE($2, name),
            config = COALESCE($3::jsonb, config),
            can_self_join_rooms = COALESCE($4, can_self_join_rooms)
        WHERE id = $1
        RETURNING {_COLUMNS}
        """,
        community_id,
        name,
        orjson.dumps(config).decode() if config is not None else None,
        can_self_join_rooms,
    )
    return _community(row) if row else None


async def patch_community(
    pool: asyncpg.Pool,
    community_id: str,
    *,
    name: str | None = None,
    config_set: dict[str, Any] | None = None,
    config_unset: Sequence[str] = (),
    can_self_join_rooms: bool | None = None,
) -> Community | None:
    """Merge changes into a community in one statement; None if unknown.

    ``config_set`` keys replace the stored ones and ``config_unset`` keys are removed,
    other stored keys are kept (a JSON merge patch). Done in SQL so two concurrent
    patches of different keys cannot undo each other.
    """
    row = await pool.fetchrow(
        f"""
        UPDATE communities SET
            name = COALESCE($2, name),
            config = (config || COALESCE($3::jsonb, '{{}}'::jsonb)) - $4::text[],
            can_self_join_rooms = COALESCE($5, can_self_join_rooms)
        WHERE id = $1
        RETURNING {_COLUMNS}
        """,
        community_id,
        name,
        orjson.dumps(config_set).decode() if config_set is not None else None,
        list(config_unset),
        can_self_join_rooms,
    )
    return _community(row) if row else None


async def list_communities(pool: asyncpg.Pool) -> list[Community]:
    """Every community, ordered by ID."""
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM communities ORDER BY id")
    return [_community(row) for row in rows]


DEFAULT_COMMUNITY_ID = "default"


class CommunityHasRooms(Exception):
    """The community still has rooms and the deletion names nowhere to move them."""

    def __init__(self, rooms: int) -> None:
        super().__init__(f"{rooms} room(s)")
        self.rooms = rooms


class UnknownMoveTarget(LookupError):
    """The community the rooms should move to does not exist (or is the one deleted)."""


async def delete_community(
    pool: asyncpg.Pool, community_id: str, *, move_rooms_to: str | None = None
) -> list[str] | None:
    """Delete a community; None if unknown. Returns the IDs of the rooms moved.

    Raises ``CommunityHasRooms`` when it has rooms and ``move_rooms_to`` is None, and
    ``UnknownMoveTarget`` when ``move_rooms_to`` is unknown or the same community. The
    move and the deletion are one transaction; invite approvals of the community go
    with it (``ON DELETE CASCADE``).
    """
    async with pool.acquire() as conn, conn.transaction():
        found = await conn.fetchval(
            "SELECT 1 FROM communities WHERE id = $1 FOR UPDATE", community_id
        )
        if found is None:
            return None
        moved: list[str] = []
        if move_rooms_to is not None:
            target = await conn.fetchval(
                "SELECT 1 FROM communities WHERE id = $1 FOR SHARE", move_rooms_to
            )
            if target is None or move_rooms_to == community_id:
                raise UnknownMoveTarget(move_rooms_to)
            rows = await conn.fetch(
                "UPDATE rooms SET community_id = $2 WHERE community_id = $1 RETURNING room_id",
                community_id,
                move_rooms_to,
            )
            moved = sorted(r["room_id"] for r in rows)
        else:
            count = await conn.fetchval(
                "SELECT count(*) FROM rooms WHERE community_id = $1", community_id
            )
            if count:
                raise CommunityHasRooms(int(count))
        await conn.execute("DELETE FROM communities WHERE id = $1", community_id)
        return moved

"""The ``rooms`` table: which rooms Warden protects, their version and community."""

from __future__ import annotations

import asyncpg

from warden.storage.records import Room

_COLUMNS = "room_id, room_version, community_id, moderator_user_id, last_state_update_ts"


def _room(row: asyncpg.Record) -> Room:
    return Room(
        room_id=row["room_id"],
        room_version=row["room_version"],
        community_id=row["community_id"],
        moderator_user_id=row["moderator_user_id"],
        last_state_update_ts=row["last_state_update_ts"],
    )


async def get_room(pool: asyncpg.Pool, room_id: str) -> Room | None:
    """The room, or None when Warden does not protect it."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM rooms WHERE room_id = $1", room_id)
    return _room(row) if row else None


async def get_rooms(pool: asyncpg.Pool, room_ids: list[str]) -> dict[str, Room]:
    """The protected rooms among ``room_ids`` (one query, whatever their number)."""
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM rooms WHERE room_id = ANY($1::text[])", room_ids
    )
    return {r["room_id"]: _room(r) for r in rows}


async def get_active_room(pool: asyncpg.Pool, room_id: str) -> Room | None:
    """The room, or None when Warden does not protect it or was removed from it (its
    learned membership is 'leave' or 'ban' by someone else's kick or ban): the spec
    says a policy server MUST have a joined user, so /sign treats such a room as
    unknown until Warden joins again."""
    row = await pool.fetchrow(
        f"""
        SELECT {", ".join("r." + c for c in _COLUMNS.split(", "))}
        FROM rooms r LEFT JOIN room_state s ON s.room_id = r.room_id
        WHERE r.room_id = $1
          AND (s.warden_membership IS NULL OR s.warden_membership NOT IN ('leave', 'ban'))
        """,
        room_id,
    )
    return _room(row) if row else None


async def list_rooms(pool: asyncpg.Pool) -> list[Room]:
    """Every protected room, ordered by ID."""
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM rooms ORDER BY room_id")
    return [_room(r) for r in rows]


async def put_room(pool: asyncpg.Pool, room_id: str, room_version: str, community_id: str) -> Room:
    """Protect a room (or move it to another community / correct its version)."""
    row = await pool.fetchrow(
        f"""
        INSERT INTO rooms (room_id, room_version, community_id) VALUES ($1, $2, $3)
        ON CONFLICT (room_id) DO UPDATE
            SET room_version = EXCLUDED.room_version, community_id = EXCLUDED.community_id
        RETURNING {_COLUMNS}
        """,
        room_id,
        room_version,
        community_id,
    )
    assert row is not None
    return _room(row)


async def set_moderator(pool: asyncpg.Pool, room_id: str, moderator_user_id: str) -> Room | None:
    """Set (or clear, with "") the user who redacts in this room; None if unknown room."""
    row = await pool.fetchrow(
        f"UPDATE rooms SET moderator_user_id = $2 WHERE room_id = $1 RETURNING {_COLUMNS}",
        room_id,
        moderator_user_id,
    )
    return _room(row) if row else None


async def delete_room(pool: asyncpg.Pool, room_id: str) -> bool:
    """Stop protecting a room; True if it was protected."""
    status = await pool.execute("DELETE FROM rooms WHERE room_id = $1", room_id)
    return bool(status.endswith(" 1"))

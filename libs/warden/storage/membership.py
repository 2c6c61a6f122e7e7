"""The ``room_memberships`` and ``invite_approvals`` tables (migration 0005)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Membership:
    """Warden's membership in one room, as last changed over federation."""

    room_id: str
    membership: str  # "join" or "leave"
    room_version: str
    event_id: str
    servers: tuple[str, ...]
    updated_ts: int


@dataclass(frozen=True)
class InviteApproval:
    """An operator's approval of invites to one room, into one community."""

    room_id: str
    community_id: str
    created_ts: int

    def to_api(self) -> dict[str, Any]:
        """The admin API's shape."""
        return {
            "room_id": self.room_id,
            "community_id": self.community_id,
            "created_ts": self.created_ts,
        }


def _membership(row: asyncpg.Record) -> Membership:
    return Membership(
        room_id=row["room_id"],
        membership=row["membership"],
        room_version=row["room_version"],
        event_id=row["event_id"],
        servers=tuple(row["servers"]),
        updated_ts=row["updated_ts"],
    )


async def record_membership(
    pool: asyncpg.Pool,
    room_id: str,
    membership: str,
    *,
    room_version: str,
    event_id: str,
    servers: Sequence[str],
) -> Membership:
    """Record that Warden joined or left ``room_id`` (replacing what was recorded)."""
    row = await pool.fetchrow(
        """
        INSERT INTO room_memberships (room_id, membership, room_version, event_id, servers,
                                      updated_ts)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (room_id) DO UPDATE SET
            membership = EXCLUDED.membership,
            room_version = EXCLUDED.room_version,
            event_id = EXCLUDED.event_id,
            servers = EXCLUDED.servers,
            updated_ts = EXCLUDED.updated_ts
        RETURNING *
        """,
        room_id,
        membership,
        room_version,
        event_id,
        list(servers),
        _now_ms(),
    )
    assert row is not None
    return _membership(row)


async def get_membership(pool: asyncpg.Pool, room_id: str) -> Membership | None:
    """Warden's recorded membership in the room, or None if it never joined it."""
    row = await pool.fetchrow("SELECT * FROM room_memberships WHERE room_id = $1", room_id)
    return _membership(row) if row else None


async def joined_rooms(pool: asyncpg.Pool, room_ids: Sequence[str]) -> set[str]:
    """Those of ``room_ids`` Warden is recorded as joined to."""
    rows = await pool.fetch(
        "SELECT room_id FROM room_memberships WHERE membership = 'join' AND room_id = ANY($1)",
        list(room_ids),
    )
    return {r["room_id"] for r in rows}


async def approve_invites(pool: asyncpg.Pool, room_id: str, community_id: str) -> InviteApproval:
    """Accept invites to ``room_id`` into ``community_id`` (replacing an earlier approval).

    Raises ``asyncpg.ForeignKeyViolationError`` for an unknown community.
    """
    row = await pool.fetchrow(
        """
        INSERT INTO invite_approvals (room_id, community_id, created_ts) VALUES ($1, $2, $3)
        ON CONFLICT (room_id) DO UPDATE SET
            community_id = EXCLUDED.community_id, created_ts = EXCLUDED.created_ts
        RETURNING room_id, community_id, created_ts
        """,
        room_id,
        community_id,
        _now_ms(),
    )
    assert row is not None
    return InviteApproval(row["room_id"], row["community_id"], row["created_ts"])


async def get_invite_approval(pool: asyncpg.Pool, room_id: str) -> InviteApproval | None:
    """The approval of invites to ``room_id``, or None."""
    row = await pool.fetchrow(
        "SELECT room_id, community_id, created_ts FROM invite_approvals WHERE room_id = $1",
        room_id,
    )
    return InviteApproval(row["room_id"], row["community_id"], row["created_ts"]) if row else None


async def withdraw_invite_approval(pool: asyncpg.Pool, room_id: str) -> bool:
    """Stop accepting invites to ``room_id``; True if it was approved."""
    status = await pool.execute("DELETE FROM invite_approvals WHERE room_id = $1", room_id)
    return bool(status.endswith(" 1"))

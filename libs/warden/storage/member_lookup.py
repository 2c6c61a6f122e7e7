"""One user's learned membership of one room (``room_members``, verified state only).

The room-state consumer writes ``room_members`` only from PDUs whose signatures verified
and that passed the auth rules, and seeding and the refresh only from verified
snapshots; so what this returns may decide a verdict.
"""

from __future__ import annotations

import asyncpg


async def learned_membership(
    pool: asyncpg.Pool, room_id: str, user_id: str
) -> tuple[str, str] | None:
    """The user's learned membership (``join``, ``invite``, ``ban``...) and the ID of the
    event that set it, or None when nothing is learned of the user."""
    row = await pool.fetchrow(
        "SELECT membership, event_id FROM room_members WHERE room_id = $1 AND user_id = $2",
        room_id,
        user_id,
    )
    if row is None:
        return None
    return row["membership"], row["event_id"]

"""One user's learned membership of one room (``room_members``, verified state only).

The room-state consumer writes ``room_members`` only from PDUs whose signatures verified
and that passed the auth rules, and seeding and the refresh only from verified
snapshots; so what this returns may decide a verdict.
"""

from __future__ import annotations

import asyncpg


async def learned_membership(pool: asyncpg.Pool, room_id: str, user_id: str) -> str | None:
    """The user's learned membership (``join``, ``invite``, ``ban``...), or None."""
    found = await pool.fetchval(
        "SELECT membership FROM room_members WHERE room_id = $1 AND user_id = $2",
        room_id,
        user_id,
    )
    return found if isinstance(found, str) else None

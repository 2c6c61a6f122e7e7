"""The ``displaynames`` table: joined members' display names per room."""

from __future__ import annotations

import asyncpg


async def get_displaynames(pool: asyncpg.Pool, room_id: str) -> dict[str, str]:
    """user ID → display name for the room's joined members that Warden has learned."""
    rows = await pool.fetch(
        "SELECT user_id, displayname FROM displaynames WHERE room_id = $1", room_id
    )
    return {r["user_id"]: r["displayname"] for r in rows}


async def replace_displaynames(pool: asyncpg.Pool, room_id: str, names: dict[str, str]) -> None:
    """Replace the room's learned display names in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM displaynames WHERE room_id = $1", room_id)
        await conn.executemany(
            "INSERT INTO displaynames (room_id, user_id, displayname) VALUES ($1, $2, $3)",
            [(room_id, u, n) for u, n in names.items()],
        )

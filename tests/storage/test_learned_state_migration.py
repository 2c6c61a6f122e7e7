"""Migration 0009 on a database learned before it: joined members move into
``room_members`` (so the /send origin rule works at once), display names injected with
state keys that are not user IDs (review H1) are dropped, and the caps' counters match."""

from __future__ import annotations

import asyncpg

from warden.storage.migrations import load_migrations, migrate


async def test_members_learned_before_0009_are_carried_over(empty_pg_database: str) -> None:
    conn = await asyncpg.connect(empty_pg_database)
    try:
        await conn.execute(
            "CREATE TABLE warden_schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for mig in load_migrations():
            if mig.version < 9:
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO warden_schema_migrations (version, name) VALUES ($1, $2)",
                    mig.version,
                    mig.name,
                )
        await conn.execute("INSERT INTO room_state (room_id) VALUES ('!r:x.org')")
        await conn.executemany(
            "INSERT INTO displaynames (room_id, user_id, displayname) VALUES ('!r:x.org', $1, '')",
            [("@a:x.org",), ("@b:y.org:8448",), ("e",), ("t",)],
        )
        await conn.execute(
            "INSERT INTO room_state_events VALUES"
            " ('!r:x.org', 'm.policy.rule.user', 'r1', '$1', '@m:x.org', 1, '{}'),"
            " ('!r:x.org', 'm.room.power_levels', '', '$2', '@m:x.org', 1, '{}')"
        )
        assert await migrate(conn) == [m.version for m in load_migrations() if m.version >= 9]
        members = await conn.fetch(
            "SELECT user_id, server_name, membership FROM room_members ORDER BY user_id"
        )
        assert [tuple(r) for r in members] == [
            ("@a:x.org", "x.org", "join"),
            ("@b:y.org:8448", "y.org:8448", "join"),
        ]
        names = await conn.fetch("SELECT user_id FROM displaynames ORDER BY user_id")
        assert [r["user_id"] for r in names] == ["@a:x.org", "@b:y.org:8448"]
        counts = await conn.fetchrow(
            "SELECT member_count, displayname_count, rule_count FROM room_state"
        )
        assert tuple(counts) == (2, 2, 1)
    finally:
        await conn.close()

"""Migrations against a real PostgreSQL: ordering, idempotence, and concurrent replicas."""

from __future__ import annotations

import asyncio

import asyncpg

from warden.storage.migrations import load_migrations, migrate, pending


def test_bundled_migrations_are_numbered_in_order() -> None:
    migs = load_migrations()
    assert migs, "no migrations bundled"
    versions = [m.version for m in migs]
    assert versions == sorted(set(versions))
    assert versions[0] == 1


async def test_migrate_applies_everything_once(empty_pg_database: str) -> None:
    conn = await asyncpg.connect(empty_pg_database)
    try:
        assert await pending(conn) == [m.version for m in load_migrations()]
        first = await migrate(conn)
        assert first == [m.version for m in load_migrations()]
        assert await migrate(conn) == []
        assert await pending(conn) == []
        assert await conn.fetchval("SELECT to_regclass('server_keys') IS NOT NULL")
    finally:
        await conn.close()


async def test_concurrent_replicas_apply_each_migration_exactly_once(
    empty_pg_database: str,
) -> None:
    # Five "replicas" start at once; without the advisory lock, CREATE TABLE in the
    # same migration would fail in all but one of them.
    conns = [await asyncpg.connect(empty_pg_database) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(v for r in results for v in r)
        assert applied == [m.version for m in load_migrations()]
        rows = await conns[0].fetchval("SELECT count(*) FROM warden_schema_migrations")
        assert rows == len(load_migrations())
    finally:
        for c in conns:
            await c.close()

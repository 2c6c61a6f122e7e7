"""Migrations against a real PostgreSQL: ordering, idempotence, and concurrent replicas."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

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


async def test_only_transaction_scoped_advisory_locks(empty_pg_database: str) -> None:
    """Safe behind PgBouncer in transaction mode (operations review gap 4): a session
    lock and its unlock could run on different server connections there."""
    conn = await asyncpg.connect(empty_pg_database)
    queries: list[str] = []
    conn.add_query_logger(lambda record: queries.append(record.query))
    try:
        await migrate(conn)
        locks = [q for q in queries if "pg_advisory" in q]
        assert locks, "no advisory lock taken"
        assert all("pg_advisory_xact_lock" in q for q in locks), locks
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        assert held == 0
    finally:
        await conn.close()


async def test_a_start_without_migrations_waits_for_the_schema(empty_pg_database: str) -> None:
    """PS_MIGRATE_ON_START=false: the service applies nothing, waits for `warden migrate`,
    and fails with the reason if it never comes."""
    from warden.runtime import dependencies
    from warden.runtime.service import ServiceRuntime
    from warden.settings import Settings

    settings = Settings(
        database=empty_pg_database, migrate_on_start=False, startup_timeout_seconds=3
    )
    runtime = ServiceRuntime("test", settings)
    with pytest.raises(RuntimeError, match="warden migrate"):
        await dependencies.postgres(runtime)
    conn = await asyncpg.connect(empty_pg_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('warden_schema_migrations')") is None

        async def migrate_later() -> None:
            await asyncio.sleep(1.0)
            await migrate(conn)

        runtime = ServiceRuntime(
            "test", Settings(**{**settings.model_dump(), "startup_timeout_seconds": 30})
        )
        task = asyncio.create_task(migrate_later())
        pool = await dependencies.postgres(runtime)
        await task
        await pool.close()
        assert await pending(conn) == []
    finally:
        await conn.close()


def test_migrate_status_lists_pending_and_applied(empty_pg_database: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PS_DATABASE": empty_pg_database}
    cmd = [sys.executable, "-m", "warden", "migrate", "--status"]
    before = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert before.returncode == 3, before.stderr
    assert before.stdout.count("pending") == len(load_migrations())
    subprocess.run(
        [sys.executable, "-m", "warden", "migrate"],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
    )
    after = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert after.returncode == 0, after.stderr
    assert "pending" not in after.stdout
    assert f"{load_migrations()[-1].version:04d}" in after.stdout

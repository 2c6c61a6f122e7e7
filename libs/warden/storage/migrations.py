"""Numbered SQL migrations, applied in order under a PostgreSQL advisory lock.

Files are ``migrations/NNNN_name.sql``; each is applied in its own transaction and
recorded in ``warden_schema_migrations``. Several replicas starting at once all call
``migrate``: the advisory lock makes the others wait, and they then find nothing left
to apply. Applied migrations are never edited; a change is a new file.

The lock is transaction-scoped (``pg_advisory_xact_lock``), taken again in each
migration's transaction: behind PgBouncer in transaction mode a session lock and its
unlock can land on different server connections, leaving the lock held forever.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger(__name__)

Connection = asyncpg.Connection | PoolConnectionProxy

# An arbitrary constant naming Warden's migration lock (pg_advisory_lock takes a bigint).
MIGRATION_LOCK_ID = 0x5741_5244_454E  # "WARDEN"

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The bundled migrations, in version order. Raises on a malformed or duplicate name."""
    found: dict[int, Migration] = {}
    for entry in resources.files("warden.storage").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = _NAME.match(entry.name)
        if m is None:
            raise ValueError(f"migration file name {entry.name!r} is not NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version}")
        found[version] = Migration(version, m.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(conn: Connection) -> list[int]:
    """Apply every pending migration; return the versions this call applied."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS warden_schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"] for r in await conn.fetch("SELECT version FROM warden_schema_migrations")
        }
    applied: list[int] = []
    for mig in load_migrations():
        if mig.version in done:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            # Another replica may have applied it while this one waited for the lock.
            if await conn.fetchval(
                "SELECT 1 FROM warden_schema_migrations WHERE version = $1", mig.version
            ):
                continue
            await conn.execute(mig.sql)
            await conn.execute(
                "INSERT INTO warden_schema_migrations (version, name) VALUES ($1, $2)",
                mig.version,
                mig.name,
            )
        logger.info("applied migration", extra={"version": mig.version, "migration": mig.name})
        applied.append(mig.version)
    return applied


async def pending(conn: Connection) -> list[int]:
    """Versions not yet applied (readiness can refuse to serve an old schema)."""
    exists = await conn.fetchval("SELECT to_regclass('warden_schema_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {
            r["version"] for r in await conn.fetch("SELECT version FROM warden_schema_migrations")
        }
    return [m.version for m in load_migrations() if m.version not in done]


async def status(conn: Connection) -> list[tuple[Migration, str | None]]:
    """Every bundled migration with when it was applied (ISO 8601), or None if pending."""
    exists = await conn.fetchval("SELECT to_regclass('warden_schema_migrations') IS NOT NULL")
    when: dict[int, str] = {}
    if exists:
        for r in await conn.fetch("SELECT version, applied_at FROM warden_schema_migrations"):
            when[r["version"]] = r["applied_at"].isoformat(timespec="seconds")
    return [(m, when.get(m.version)) for m in load_migrations()]

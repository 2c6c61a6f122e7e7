"""The asyncpg connection pool shared by a service's storage code."""

from __future__ import annotations

from typing import Any

import asyncpg

from warden.settings import Settings

# What PostgreSQL being away raises, for code that carries on without it (answers 503,
# retries later, keeps its batch): server errors, refused or dropped connections, a pool
# closing, and asyncpg's client-side state error on a connection the server cut in the
# middle of an operation. A PostgreSQL shutting down under load sends each connection a
# FATAL and closes it; a pooled connection that got it while idle fails its next query
# with ``InternalClientError`` ("cannot switch to state 12; another operation (2) is in
# progress"), which subclasses neither of the others (seen in the fault suite: it ended
# the moderator's command sender, and with it the service). Declared once, so that
# every catch site knows every kind.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


def dsn_for_asyncpg(url: str) -> str:
    """Accept the ``postgres://`` URLs policyserv documents; asyncpg takes both schemes."""
    return url


# Every statement is planned for its own parameters. asyncpg prepares each statement once
# per connection, and after five runs PostgreSQL may switch to a generic plan kept until
# the table is next analysed. Chosen while ``verdicts`` was small (a new deployment, a
# new database), the verdict lookup (``event_id = ANY($1)``) kept a sequential scan:
# 5 ms per lookup at 30,000 rows instead of 0.4 ms, and the worst tail latencies of
# ``make bench``. Planning these short statements afresh costs too little to measure.
CONNECTION_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset query.

    By default every release runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` (one more round trip per query on the hot path). Warden sets no session
    state on pooled connections: no ``SET``, no ``LISTEN``, and the migration lock is
    released explicitly. asyncpg still rolls back an open transaction on release.
    """


async def create_pool(settings: Settings, **kwargs: Any) -> asyncpg.Pool:
    """Open the pool sized by ``PS_DATABASE_MAX_OPEN_CONNS`` / ``_MAX_IDLE_CONNS``.

    asyncpg's statement cache is ``PS_DATABASE_STATEMENT_CACHE_SIZE``: 0 behind a
    transaction-pooling PgBouncer, where consecutive statements of one client connection
    may run on different server connections (let ``plan_cache_mode`` through there too:
    ``ignore_startup_parameters``, or ``ALTER ROLE ... SET plan_cache_mode =
    force_custom_plan``). See docs/operator-guide.md, "PostgreSQL connections".
    """
    min_size = min(settings.database_max_idle_conns, settings.database_max_open_conns)
    kwargs.setdefault("statement_cache_size", settings.database_statement_cache_size)
    server_settings = {**CONNECTION_SETTINGS, **kwargs.pop("server_settings", {})}
    pool = await asyncpg.create_pool(
        dsn_for_asyncpg(settings.database),
        min_size=min_size,
        max_size=settings.database_max_open_conns,
        command_timeout=30,
        reset=_keep_session,
        server_settings=server_settings,
        **kwargs,
    )
    assert pool is not None
    return pool


async def ping(pool: asyncpg.Pool) -> None:
    """Raise if the database does not answer a trivial query (readiness)."""
    async with pool.acquire(timeout=2) as conn:
        await conn.fetchval("SELECT 1", timeout=2)

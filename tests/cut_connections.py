"""A real asyncpg pool whose next queries fail as on a connection PostgreSQL cut.

A PostgreSQL shutting down under load sends each connection a FATAL and closes it; a
pooled connection that got it while idle fails its next query with asyncpg's
``InternalClientError`` ("cannot switch to state 12; another operation (2) is in
progress"). The fault suite's PostgreSQL restarts show it only now and then, so the tests
of the code that must outlive it put it in front of the real pool: the next ``failures``
queries raise ``error``, the rest run on the real database.
"""

from __future__ import annotations

from typing import Any

import asyncpg


def cut_connection() -> asyncpg.exceptions.InternalClientError:
    """What asyncpg raises for a query on a connection the server cut."""
    return asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )


class CutConnectionPool:
    """``pool``, except that the next ``failures`` queries raise ``error`` (by default
    ``cut_connection()``)."""

    def __init__(
        self, pool: asyncpg.Pool, error: BaseException | None = None, failures: int = 1
    ) -> None:
        self._pool = pool
        self._error = error
        self.failures_left = failures

    def _maybe_fail(self) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise self._error if self._error is not None else cut_connection()

    async def execute(self, *args: Any, **kwargs: Any) -> str:
        self._maybe_fail()
        result: str = await self._pool.execute(*args, **kwargs)
        return result

    async def fetch(self, *args: Any, **kwargs: Any) -> list[asyncpg.Record]:
        self._maybe_fail()
        rows: list[asyncpg.Record] = await self._pool.fetch(*args, **kwargs)
        return rows

    async def fetchrow(self, *args: Any, **kwargs: Any) -> asyncpg.Record | None:
        self._maybe_fail()
        row: asyncpg.Record | None = await self._pool.fetchrow(*args, **kwargs)
        return row

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail()
        return await self._pool.fetchval(*args, **kwargs)

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail()
        return self._pool.acquire(*args, **kwargs)

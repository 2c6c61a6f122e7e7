"""Fixtures for the real services every test talks to: PostgreSQL, Redis and NATS.

Each test session gets its own fresh PostgreSQL database (dropped at the end) with all
migrations applied; Redis tests use a dedicated logical database, flushed per test.
Override the server addresses with WARDEN_TEST_PG_ADMIN, WARDEN_TEST_REDIS and
WARDEN_TEST_NATS.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from warden.settings import Settings

pytest_plugins = ["tests.service_processes"]

PG_ADMIN = os.environ.get("WARDEN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("WARDEN_TEST_REDIS", "redis://127.0.0.1:6379/15")
NATS_URL = os.environ.get("WARDEN_TEST_NATS", "nats://127.0.0.1:4222")


def _pg_url_for(dbname: str) -> str:
    base, _, _ = PG_ADMIN.rpartition("/")
    return f"{base}/{dbname}"


async def _create_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh, migrated database for this test session; yields its URL."""
    import asyncio

    from warden.storage.migrations import migrate

    name = f"warden_test_{uuid.uuid4().hex[:12]}"

    async def setup() -> None:
        await _create_database(name)
        conn = await asyncpg.connect(_pg_url_for(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    try:
        yield _pg_url_for(name)
    finally:
        asyncio.run(_drop_database(name))


@pytest.fixture
def empty_pg_database() -> Iterator[str]:
    """A fresh database with no migrations applied, dropped after the test."""
    import asyncio

    name = f"warden_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(name))
    try:
        yield _pg_url_for(name)
    finally:
        asyncio.run(_drop_database(name))


@pytest.fixture
async def pg_pool(pg_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the session database."""
    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    """A client on the test Redis database, flushed before and after the test."""
    client = aioredis.from_url(REDIS_URL)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
async def nats_client() -> AsyncIterator[NATS]:
    """A NATS connection (JetStream available)."""
    nc = await nats.connect(NATS_URL)
    try:
        yield nc
    finally:
        await nc.drain()


@pytest.fixture
def make_settings(pg_database: str) -> Callable[..., Settings]:
    """Build ``Settings`` pointing at the test services; keyword arguments override."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database": pg_database,
            "redis_url": REDIS_URL,
            "nats_url": NATS_URL,
            "homeserver_name": "warden.test",
        }
        values.update(overrides)
        return Settings(**values)

    return factory

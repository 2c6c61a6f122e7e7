"""Fixtures for the admin API tests: the router in a FastAPI app of its own, on a
private database (so listing rooms is not disturbed by other tests' rows), with real
PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS

from tests.admin_api.admin_api_helpers import (
    API_KEY,
    AUTH,
    NATS_URL,
    PG_ADMIN,
    ConfigChanges,
    build_test_app,
    client_for,
    reset_database,
)
from warden.bus.subjects import CONFIG_CHANGED_SUBJECT


@pytest.fixture(scope="session")
def admin_pg_database() -> Iterator[str]:
    """A migrated database used only by these tests; yields its URL."""
    from warden.storage.migrations import migrate

    name = f"warden_admin_test_{uuid.uuid4().hex[:12]}"
    base, _, _ = PG_ADMIN.rpartition("/")
    url = f"{base}/{name}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def setup() -> None:
        await run(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    try:
        yield url
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def admin_pool(admin_pg_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the private database, reset before the test."""
    pool = await asyncpg.create_pool(admin_pg_database, min_size=1, max_size=4)
    assert pool is not None
    await reset_database(pool)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def publisher_nats() -> AsyncIterator[NATS]:
    """The router's own NATS connection (the tests listen on another one)."""
    nc = await nats.connect(NATS_URL)
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
async def admin_app(admin_pool: asyncpg.Pool, publisher_nats: NATS) -> FastAPI:
    return build_test_app(API_KEY, admin_pool, publisher_nats)


@pytest.fixture
async def admin(admin_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client sending the right API key."""
    async with client_for(admin_app, AUTH) as c:
        yield c


@pytest.fixture
async def anonymous(admin_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client sending no Authorization header."""
    async with client_for(admin_app) as c:
        yield c


@pytest.fixture
async def config_changes(nats_client: NATS) -> AsyncIterator[ConfigChanges]:
    """Subscribe to config-change notifications for the duration of the test."""
    changes = ConfigChanges()
    sub = await nats_client.subscribe(CONFIG_CHANGED_SUBJECT, cb=changes.on_message)
    await nats_client.flush()  # the subscription is registered before the test acts
    try:
        yield changes
    finally:
        await sub.unsubscribe()

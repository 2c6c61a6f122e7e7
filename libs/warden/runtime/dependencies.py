"""Connecting a service to PostgreSQL, Redis and NATS, with readiness and shutdown wired in.

Connections are retried with backoff for ``PS_STARTUP_TIMEOUT_SECONDS`` so a service
started alongside its dependencies (``docker compose up``, a fresh Kubernetes rollout)
waits for them instead of crash-looping; past that it exits with one clear error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from warden.bus.connection import check_nats, connect_nats, nats_auth
from warden.runtime.service import ServiceRuntime
from warden.settings import Settings
from warden.storage.database import DATABASE_ERRORS, create_pool, ping
from warden.storage.migrations import migrate, pending
from warden.telemetry.runtime_metrics import watch_pool

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a dependency that is not up yet raises.
_NOT_ANSWERING: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, aioredis.RedisError)


class DependencyUnavailable(RuntimeError):
    """A dependency did not answer within the startup timeout."""


async def _retry(what: str, budget_seconds: float, connect: Callable[[], Awaitable[T]]) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_seconds
    delay = 0.2
    while True:
        try:
            return await connect()
        except _NOT_ANSWERING as exc:
            if loop.time() + delay > deadline:
                raise DependencyUnavailable(f"{what} did not answer: {exc}") from exc
            logger.warning(
                "dependency not answering yet; retrying",
                extra={"dependency": what, "error": str(exc), "retry_in": delay},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def postgres(runtime: ServiceRuntime, *, apply_migrations: bool = True) -> asyncpg.Pool:
    """Open the pool, apply pending migrations, and register readiness and close."""
    s = runtime.settings
    pool = await _retry("postgresql", s.startup_timeout_seconds, lambda: create_pool(s))
    if apply_migrations and s.migrate_on_start:
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            logger.info("migrations applied at start", extra={"versions": applied})
    elif apply_migrations:
        await _wait_for_schema(pool, s.startup_timeout_seconds)
    runtime.health.add_check("postgresql", lambda: ping(pool))
    watch_pool(pool)
    runtime.add_shutdown_hook("postgresql", pool.close)
    return pool


async def _wait_for_schema(pool: asyncpg.Pool, limit_seconds: float) -> None:
    """PS_MIGRATE_ON_START=false: wait for `warden migrate` (a Job or hook) to finish."""
    deadline = time.monotonic() + limit_seconds
    while True:
        async with pool.acquire() as conn:
            missing = await pending(conn)
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"the database schema lacks migrations {missing}: run `warden migrate` "
                "(PS_MIGRATE_ON_START is false)"
            )
        logger.warning("waiting for migrations", extra={"pending": missing})
        await asyncio.sleep(2.0)


def redis_client(s: Settings) -> aioredis.Redis:
    """A Redis client on a blocking pool of ``PS_REDIS_MAX_CONNECTIONS`` connections.

    redis-py's default asyncio pool fails a command at once (``MaxConnectionsError``)
    when all its connections are busy, so a burst of concurrent requests turned into
    errors (and, in the rate limiter, into no limit). A blocking pool makes a command
    wait for a free connection, up to ``PS_REDIS_POOL_TIMEOUT_SECONDS``; past that it
    raises ``redis.ConnectionError`` ("No connection available"), a ``RedisError`` that
    callers already handle as Redis being unavailable.

    With ``PS_REDIS_SENTINELS`` the master is found through the sentinels
    (``warden.runtime.redis_sentinel``), with the same pool behaviour.
    """
    pool_kwargs: dict[str, Any] = {
        "max_connections": s.redis_max_connections,
        "timeout": s.redis_pool_timeout_seconds,
        "socket_connect_timeout": 5,
        "socket_timeout": 5,
        "health_check_interval": 30,
    }
    if s.redis_sentinels:
        from warden.runtime.redis_sentinel import sentinel_client

        return sentinel_client(s, **pool_kwargs)
    pool = aioredis.BlockingConnectionPool.from_url(s.redis_url, **pool_kwargs)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose closes it


async def redis(runtime: ServiceRuntime, *, required: bool = True) -> aioredis.Redis:
    """Connect to Redis (hiredis parser when installed) and register readiness.

    ``required`` False: the service works without Redis (``warden.runtime.redis_outage``),
    so it starts without waiting for it and stays ready while it is down (readiness
    says ``degraded``); the client connects whenever Redis answers.
    """
    s = runtime.settings
    client = redis_client(s)

    async def ping_redis() -> None:
        await client.ping()

    if required:
        await _retry("redis", s.startup_timeout_seconds, ping_redis)
    else:
        try:
            await asyncio.wait_for(ping_redis(), 5.0)
        except (OSError, aioredis.RedisError, TimeoutError) as exc:
            logger.warning(
                "Redis not answering; starting without it (used once it answers)",
                extra={"error": str(exc)},
            )
    runtime.health.add_check("redis", ping_redis, required=required)
    runtime.add_shutdown_hook("redis", client.aclose)
    return client


async def nats(runtime: ServiceRuntime) -> NATS:
    """Connect to NATS, register readiness, and drain on shutdown."""
    s = runtime.settings
    nc = await _retry(
        "nats",
        s.startup_timeout_seconds,
        lambda: connect_nats(
            s.nats_url,
            name=f"warden-{runtime.name}",
            initial_timeout=s.startup_timeout_seconds,
            auth=nats_auth(s),
        ),
    )
    runtime.health.add_check("nats", lambda: check_nats(nc))

    async def drain() -> None:
        if not nc.is_closed:
            await nc.drain()

    runtime.add_shutdown_hook("nats", drain)
    return nc

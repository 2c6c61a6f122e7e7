"""The services' Redis pool (M6): bounded, and waiting for a free connection instead of
failing at once when every connection is busy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from warden.runtime.dependencies import redis_client
from warden.settings import Settings


async def test_more_concurrent_commands_than_connections_wait_their_turn(
    make_settings: Callable[..., Settings],
) -> None:
    # Default settings: 100 connections. redis-py's default pool raised
    # MaxConnectionsError for the 101st concurrent command.
    client = redis_client(make_settings())
    key = f"warden:test:empty:{uuid.uuid4().hex}"
    try:
        results = await asyncio.gather(*(client.blpop([key], timeout=0.3) for _ in range(150)))
        assert results == [None] * 150
        pool = client.connection_pool
        assert pool.max_connections == 100
    finally:
        await client.aclose()


async def test_a_command_waits_at_most_the_pool_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    client = redis_client(make_settings(redis_max_connections=1, redis_pool_timeout_seconds=0.2))
    key = f"warden:test:empty:{uuid.uuid4().hex}"
    try:
        holder = asyncio.create_task(client.blpop([key], timeout=2))
        await asyncio.sleep(0.1)  # the only connection is now busy
        with pytest.raises(RedisConnectionError):  # a RedisError: callers answer 503
            await client.get(key)
        assert await holder is None
    finally:
        await client.aclose()

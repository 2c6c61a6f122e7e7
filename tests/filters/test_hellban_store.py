"""``HellbanStore``: bans in Redis, and in the worker's memory while Redis is down (a
redis-server of the test's own, stopped and started again)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.private_redis import PrivateRedis
from warden import redis_keys
from warden.filters import hellban_store
from warden.filters.hellban_store import HellbanStore
from warden.storage.redis_autopipeline import RedisAutoPipeline


@pytest.fixture
async def private() -> AsyncIterator[tuple[PrivateRedis, aioredis.Redis]]:
    server = PrivateRedis()
    server.start()
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=1)
    try:
        yield server, client
    finally:
        await client.aclose()
        server.stop()


def _fallbacks() -> float:
    value = REGISTRY.get_sample_value("warden_redis_fallbacks_total", {"use": "hellban"})
    return value or 0.0


async def test_bans_go_to_redis_and_to_memory_while_it_is_down(
    private: tuple[PrivateRedis, aioredis.Redis],
) -> None:
    server, client = private
    store = HellbanStore(RedisAutoPipeline(client))
    await store.ban("c", "@a:x", 60)
    assert await client.ttl(redis_keys.hellban("c", "@a:x")) > 0  # in Redis, shared
    assert await store.banned("c", "@a:x") and not await store.banned("c", "@b:x")
    assert not store.banned_here("c", "@a:x")  # nothing kept in memory

    server.stop()
    before = _fallbacks()
    # Redis down: a ban another worker set is not seen (judged on content alone), a new
    # one is kept in this worker, and nothing raises.
    assert not await store.banned("c", "@a:x")
    await store.ban("c", "@b:x", 60)
    assert await store.banned("c", "@b:x") and store.banned_here("c", "@b:x")
    assert not await store.banned("other", "@b:x")  # per community
    assert _fallbacks() >= before + 3

    server.start()
    await asyncio.sleep(1.1)  # the skip after a failure lapses: Redis is asked again
    assert not await store.banned("c", "@a:x")  # the restarted Redis kept nothing
    assert await store.banned("c", "@b:x")  # the worker's own ban still counts
    assert not await client.exists(redis_keys.hellban("c", "@b:x"))  # not copied


async def test_bans_kept_in_memory_expire_are_not_extended_and_are_bounded(
    private: tuple[PrivateRedis, aioredis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = private
    server.stop()
    store = HellbanStore(RedisAutoPipeline(client))
    await store.ban("c", "@short:x", 1)
    await store.ban("c", "@short:x", 600)  # a repeat offence does not extend it
    assert store.banned_here("c", "@short:x")
    await asyncio.sleep(1.1)
    assert not store.banned_here("c", "@short:x")

    monkeypatch.setattr(hellban_store, "MAX_LOCAL_BANS", 3)
    for i in range(5):
        await store.ban("c", f"@u{i}:x", 60)
    kept = [i for i in range(5) if store.banned_here("c", f"@u{i}:x")]
    assert kept == [2, 3, 4]  # the oldest dropped first

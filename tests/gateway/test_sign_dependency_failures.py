"""When PostgreSQL cannot answer, ``/sign`` answers 503 with ``Retry-After``, never 500."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.cut_connections import CutConnectionPool
from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    Gateway,
    GatewayFactory,
    Origin,
    new_room_id,
)
from tests.gateway.real_worker import real_worker  # noqa: F401
from tests.service_processes import free_port
from warden import redis_keys
from warden.filters.hellban_store import HellbanStore
from warden.matrix.event_hashes import event_id_from_reference_hash, redacted_signing_bytes
from warden.matrix.room_versions import get_room_version
from warden.storage.redis_autopipeline import RedisAutoPipeline
from warden.storage.verdicts import get_verdict
from warden_filter_worker.evaluation import EvaluationService


async def test_database_down_is_503(
    make_gateway: GatewayFactory, origin: Origin, pg_database: str
) -> None:
    closed = await asyncpg.create_pool(pg_database, min_size=0, max_size=1)
    assert closed is not None
    await closed.close()
    gateway = await make_gateway(room_pool=closed)
    event = origin.event(new_room_id("12"), "12")

    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )

    assert r.status_code == 503
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert r.headers["Retry-After"] == "5"


async def test_a_connection_cut_by_a_restarting_database_is_503(
    make_gateway: GatewayFactory, origin: Origin, pg_pool: asyncpg.Pool
) -> None:
    # asyncpg's InternalClientError (a pooled connection PostgreSQL cut while shutting
    # down) subclasses none of its other errors: it was answered 500.
    gateway = await make_gateway(room_pool=CutConnectionPool(pg_pool, failures=100))
    event = origin.event(new_room_id("12"), "12")

    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )

    assert r.status_code == 503, r.text
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert r.headers["Retry-After"] == "5"


# --- H9: a filter's dependency failing is not a verdict ---


async def _sign(gateway: Gateway, origin: Origin, event: dict[str, Any]) -> httpx.Response:
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


async def test_locked_table_is_503_not_a_refusal_and_the_next_ask_signs(
    gateway: Gateway,
    origin: Origin,
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,  # noqa: F811
    pg_database: str,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    """The review's test: hold ``LOCK TABLE displaynames`` while a neutral message is
    signed (the mentions filter reads it): 503 with Retry-After and no stored verdict;
    once released, asking again signs it."""
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12", body="a perfectly ordinary message")
    locker = await asyncpg.connect(pg_database)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE displaynames IN ACCESS EXCLUSIVE MODE")
        r = await _sign(gateway, origin, event)
        await tx.rollback()
    finally:
        await locker.close()

    assert r.status_code == 503, r.text
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert int(r.headers["Retry-After"]) >= 1
    # Nothing stored in PostgreSQL, nothing cached in Redis.
    assert not await _remembered(pg_pool, redis_client, _event_id(event))

    r = await _sign(gateway, origin, event)
    assert r.status_code == 200, r.text
    assert GATEWAY_NAME in r.json()
    assert await _remembered(pg_pool, redis_client, _event_id(event))


async def test_redis_down_for_the_hellban_filters_falls_back_to_the_workers_bans(
    gateway: Gateway,
    origin: Origin,
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,  # noqa: F811
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    """The hellban filters' Redis fails (a dead server) while the worker's claims work:
    the spam event is still judged (refused), its sender banned in the worker's memory,
    and the sender's next, innocent event refused for that ban; nothing waits for Redis
    (hellban_store; with a Redis that comes back: tests/filters/test_hellban_store.py)."""
    room_id = await protect_room(new_room_id("12"), "12")
    spam = origin.event(room_id, "12", body="this is spam")
    deps = real_worker._pipeline.deps
    working = deps.hellbans
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    deps.hellbans = HellbanStore(RedisAutoPipeline(dead))
    fallbacks = _fallbacks("hellban")
    try:
        r = await _sign(gateway, origin, spam)
        assert r.status_code == 400, r.text  # judged: refused for the keyword
        assert await _remembered(pg_pool, redis_client, _event_id(spam))
        follow_up = origin.event(room_id, "12", body="innocent", sender=spam["sender"])
        r = await _sign(gateway, origin, follow_up)
        assert r.status_code == 400, r.text  # refused by the ban the worker kept
        stored = await get_verdict(pg_pool, _event_id(follow_up))
        assert stored is not None and "hellban_prefilter" in {
            f.name for f in stored.filters if f.content_class.label == "prohibited"
        }
        assert _fallbacks("hellban") > fallbacks
        assert not await redis_client.exists(redis_keys.hellban("default", spam["sender"]))
    finally:
        deps.hellbans = working
        await dead.aclose()


def _fallbacks(use: str) -> float:
    value = REGISTRY.get_sample_value("warden_redis_fallbacks_total", {"use": use})
    return value or 0.0


def _event_id(event: dict[str, Any]) -> str:
    version = get_room_version("12")
    digest = hashlib.sha256(redacted_signing_bytes(version, event)).digest()
    return event_id_from_reference_hash(version, digest)


async def _remembered(pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, event_id: str) -> bool:
    """Whether a verdict for ``event_id`` is stored (PostgreSQL) or cached (Redis)."""
    stored = await get_verdict(pg_pool, event_id) is not None
    return stored or bool(await redis_client.exists(redis_keys.verdict(event_id)))

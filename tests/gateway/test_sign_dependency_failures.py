"""When PostgreSQL cannot answer, ``/sign`` answers 503 with ``Retry-After``, never 500."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis

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


async def test_redis_down_for_the_hellban_postfilter_is_503_then_refused(
    gateway: Gateway,
    origin: Origin,
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,  # noqa: F811
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    """The filters' Redis fails (their auto-pipeline sends to a dead server) while the
    worker's claims work: a spam event needs the hellban postfilter to set the sender's
    ban, which fails: 503, nothing stored; with Redis back, the same event is refused.
    (The hellban prefilter reads the ban in the worker's claiming script, so it needs no
    Redis of its own: the worker's own Redis failing is in test_evaluation_without_redis.)"""
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12", body="this is spam")
    deps = real_worker._pipeline.deps
    working = deps.auto_pipeline
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    deps.auto_pipeline = RedisAutoPipeline(dead)
    try:
        r = await _sign(gateway, origin, event)
    finally:
        deps.auto_pipeline = working
        await dead.aclose()
    assert r.status_code == 503, r.text
    assert "Retry-After" in r.headers
    assert not await _remembered(pg_pool, redis_client, _event_id(event))

    r = await _sign(gateway, origin, event)
    assert r.status_code == 400, r.text  # refused: judged, and the sender now banned
    assert await redis_client.exists(redis_keys.hellban("default", event["sender"]))


def _event_id(event: dict[str, Any]) -> str:
    version = get_room_version("12")
    digest = hashlib.sha256(redacted_signing_bytes(version, event)).digest()
    return event_id_from_reference_hash(version, digest)


async def _remembered(pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, event_id: str) -> bool:
    """Whether a verdict for ``event_id`` is stored (PostgreSQL) or cached (Redis)."""
    stored = await get_verdict(pg_pool, event_id) is not None
    return stored or bool(await redis_client.exists(redis_keys.verdict(event_id)))

"""When PostgreSQL cannot answer, ``/sign`` answers 503 with ``Retry-After``, never 500."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    Gateway,
    GatewayFactory,
    Origin,
    new_room_id,
)
from tests.service_processes import free_port
from warden import redis_keys
from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import FilterDeps
from warden.matrix.event_hashes import event_id_from_reference_hash, redacted_signing_bytes
from warden.matrix.room_versions import get_room_version
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden.storage.redis_autopipeline import RedisAutoPipeline
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


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


@pytest.fixture
async def real_worker(
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    evaluate_subject: str,
) -> AsyncIterator[EvaluationService]:
    """The real evaluation service, in process, on this test's evaluation subject."""
    await ensure_verdicts_stream(nats_client.jetstream())
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id="@warden:gateway.test")
    service = EvaluationService(
        redis=redis_client,
        pool=pg_pool,
        pipeline=Pipeline(deps, timeout_seconds=1.0),
        configs=CommunityConfigCache(pg_pool, instance_defaults({})),
        writer=GroupCommitWriter(pg_pool),
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=2,
        wait_seconds=3,
        store_timeout_seconds=1.0,
    )
    await service.start(nats_client, evaluate_subject)
    yield service
    await service.stop()


async def _sign(gateway: Gateway, origin: Origin, event: dict[str, Any]) -> httpx.Response:
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


async def test_locked_table_is_503_not_a_refusal_and_the_next_ask_signs(
    gateway: Gateway,
    origin: Origin,
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,
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


async def test_redis_down_for_the_hellban_filter_is_503_then_signed(
    gateway: Gateway,
    origin: Origin,
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    """The hellban prefilter's Redis fails (its auto-pipeline sends to a dead server):
    503, nothing stored; with Redis back, the same event is signed."""
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12", body="nothing to see here")
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
    assert r.status_code == 200, r.text


def _event_id(event: dict[str, Any]) -> str:
    version = get_room_version("12")
    digest = hashlib.sha256(redacted_signing_bytes(version, event)).digest()
    return event_id_from_reference_hash(version, digest)


async def _remembered(pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, event_id: str) -> bool:
    """Whether a verdict for ``event_id`` is stored (PostgreSQL) or cached (Redis)."""
    stored = await get_verdict(pg_pool, event_id) is not None
    return stored or bool(await redis_client.exists(redis_keys.verdict(event_id)))

"""H9 at the worker: when PostgreSQL or Redis fail, the reply says "try again"
(``retry_after_ms``) and nothing is stored, cached or published; claims are released."""

from __future__ import annotations

import uuid

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.filters.filter_helpers import OWN_USER, message
from tests.service_processes import free_port
from warden import redis_keys
from warden.bus.evaluation import EvaluationRequest
from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import FilterDeps
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


def service(redis: aioredis.Redis, pool: asyncpg.Pool, nats: NATS) -> EvaluationService:
    deps = FilterDeps(redis=redis, pool=pool, local_user_id=OWN_USER)
    return EvaluationService(
        redis=redis,
        pool=pool,
        pipeline=Pipeline(deps, timeout_seconds=1),
        configs=CommunityConfigCache(pool, instance_defaults({})),
        writer=GroupCommitWriter(pool),
        publisher=VerdictPublisher(nats),
        claim_ttl_seconds=2,
        wait_seconds=3,
        store_timeout_seconds=1,
    )


def request(body: str) -> EvaluationRequest:
    return EvaluationRequest(
        event=message(body),
        event_id=f"${uuid.uuid4().hex}",
        community_id="default",
        origin="origin.example",
        source="sign",
    )


async def test_postgresql_down_is_unavailable_and_leaves_nothing_behind(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, pg_database: str, nats_client: NATS
) -> None:
    await ensure_verdicts_stream(nats_client.jetstream())
    closed = await asyncpg.create_pool(pg_database, min_size=0, max_size=1)
    await closed.close()
    down = service(redis_client, closed, nats_client)
    req = request("buy spam now")  # a refusal, had it been judged

    reply, outcome = await down.answer(req)

    assert outcome == "unavailable"
    assert orjson.loads(reply)["retry_after_ms"] > 0
    assert not await redis_client.exists(redis_keys.verdict(req.event_id))
    assert not await redis_client.exists(redis_keys.evaluation_claim(req.event_id))
    assert await get_verdict(pg_pool, req.event_id) is None

    # PostgreSQL is back: the same event is judged.
    up = service(redis_client, pg_pool, nats_client)
    reply, outcome = await up.answer(req)
    assert outcome == "first_time"
    await up.stop()


async def test_redis_down_is_unavailable_for_a_filter_keeping_state_in_redis(
    pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    """The claims fall back to PostgreSQL (test_evaluation_without_redis), but the
    hellban filter (on by default) cannot judge without Redis: "try again"."""
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        req = request("hello")
        reply, outcome = await service(dead, pg_pool, nats_client).answer(req)
    finally:
        await dead.aclose()
    assert outcome == "unavailable"
    assert orjson.loads(reply)["retry_after_ms"] > 0
    assert await get_verdict(pg_pool, req.event_id) is None

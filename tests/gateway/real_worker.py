"""The real filter worker's evaluation service, in process, for gateway tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import FilterDeps
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


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

"""Evaluation claims: a dead worker's claim is taken over before waiters give up (L2),
and a live holder keeps its claim while it works."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.filters.filter_helpers import OWN_USER, message
from warden import redis_keys
from warden.bus.evaluation import EvaluationRequest
from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.filters.registry import FILTERS
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.settings import Settings
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.main import claim_timing
from warden_filter_worker.publisher import VerdictPublisher


class Slow(Filter):
    """Takes a while (longer than a claim lives unrenewed); counts its runs."""

    name = "test_slow"
    group = Group.MAIN
    runs = 0
    seconds = 1.5

    async def check(self, ctx: FilterContext) -> FilterResult:
        Slow.runs += 1
        await asyncio.sleep(Slow.seconds)
        return FilterResult.neutral()


ServiceFactory = Callable[..., EvaluationService]


@pytest.fixture
async def make_service(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, nats_client: NATS
) -> AsyncIterator[ServiceFactory]:
    await ensure_verdicts_stream(nats_client.jetstream())
    services: list[EvaluationService] = []

    def make(*, claim_ttl_seconds: float, wait_seconds: float, slow: bool = False) -> Any:
        deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
        filters = (*FILTERS, Slow) if slow else FILTERS
        service = EvaluationService(
            redis=redis_client,
            pool=pg_pool,
            pipeline=Pipeline(deps, timeout_seconds=5, filters=filters),
            configs=CommunityConfigCache(pg_pool, instance_defaults({})),
            writer=GroupCommitWriter(pg_pool),
            publisher=VerdictPublisher(nats_client),
            claim_ttl_seconds=claim_ttl_seconds,
            wait_seconds=wait_seconds,
        )
        services.append(service)
        return service

    yield make
    for service in services:
        await service.stop()


def request(body: str = "hello") -> EvaluationRequest:
    return EvaluationRequest(
        event=message(body),
        event_id=f"${uuid.uuid4().hex}",
        community_id="default",
        origin="origin.example",
        source="sign",
        reference_hash="refhash",
    )


def test_claims_lapse_well_before_waiters_give_up(
    make_settings: Callable[..., Settings],
) -> None:
    for timeout in (0.5, 5.0, 30.0):
        ttl, wait = claim_timing(make_settings(filter_timeout_seconds=timeout))
        assert ttl * 3 <= wait
    ttl, wait = claim_timing(make_settings())
    assert (ttl, wait) == (5.0, 25.0)


async def test_a_dead_workers_claim_is_taken_over_within_the_wait(
    make_service: ServiceFactory,
    make_settings: Callable[..., Settings],
    redis_client: aioredis.Redis,
) -> None:
    """A claim as a worker killed mid-evaluation leaves it (nobody renews it): the next
    request is judged, not answered with an error after the wait."""
    ttl, wait = claim_timing(make_settings(filter_timeout_seconds=0.5))
    service = make_service(claim_ttl_seconds=ttl, wait_seconds=wait)
    req = request("hello")
    await redis_client.set(
        redis_keys.evaluation_claim(req.event_id), "killed-worker", px=int(ttl * 1000)
    )

    reply, outcome = await service.answer(req)

    assert outcome == "first_time", reply
    assert Verdict.from_json(reply).content_class is ContentClass.NEUTRAL


async def test_a_live_holder_keeps_its_claim_while_it_works(
    make_service: ServiceFactory, redis_client: aioredis.Redis
) -> None:
    """The holder's evaluation outlasts the claim's TTL several times; another worker
    asking meanwhile waits for its verdict rather than judging the event again."""
    holder = make_service(claim_ttl_seconds=0.3, wait_seconds=5, slow=True)
    other = make_service(claim_ttl_seconds=0.3, wait_seconds=5, slow=True)
    Slow.runs = 0
    req = request("hello")

    first = asyncio.create_task(holder.answer(req))
    while not await redis_client.exists(redis_keys.evaluation_claim(req.event_id)):
        await asyncio.sleep(0.01)
    (reply, outcome), (theirs, their_outcome) = await asyncio.gather(first, other.answer(req))

    assert outcome == "first_time"
    assert their_outcome == "waited" and theirs == reply
    assert Slow.runs == 1
    # Released once done: nothing left to lapse.
    assert not await redis_client.exists(redis_keys.evaluation_claim(req.event_id))

"""A room v1/v2 refusal imported unbound is bound by the worker that holds the event's
claim, to the event it was asked about; a worker waiting on that claim does not answer
the unbound row meanwhile."""

from __future__ import annotations

import dataclasses

import asyncpg
import redis.asyncio as aioredis

from tests.filter_worker.test_evaluation_claims import ServiceFactory, make_service, request
from tests.storage.test_unbound_verdicts import store_unbound
from warden import redis_keys
from warden.policy.verdict import ContentClass, Verdict

__all__ = ["make_service"]  # the fixture


async def test_the_first_ask_binds_and_later_asks_get_that_binding(
    make_service: ServiceFactory, pg_pool: asyncpg.Pool
) -> None:
    service = make_service(claim_ttl_seconds=5, wait_seconds=25)
    first = request("hello")
    await store_unbound(pg_pool, first.event_id)

    reply, outcome = await service.answer(first)

    assert outcome == "cached_db", reply
    verdict = Verdict.from_json(reply)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert verdict.harms == ("org.matrix.msc4456.spam",)
    assert (verdict.reference_hash, verdict.room_id, verdict.community_id) == (
        first.reference_hash,
        first.event["room_id"],
        "default",
    )
    other = dataclasses.replace(request("other"), event_id=first.event_id, reference_hash="h2")
    reply, outcome = await service.answer(other)
    assert outcome == "cached_redis"
    assert Verdict.from_json(reply).reference_hash == first.reference_hash


async def test_a_waiter_leaves_the_binding_to_the_claims_holder(
    make_service: ServiceFactory, pg_pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    service = make_service(claim_ttl_seconds=1.0, wait_seconds=5)
    req = request("hello")
    await store_unbound(pg_pool, req.event_id)
    # Another worker holds the claim (and dies): the waiter polls PostgreSQL meanwhile,
    # finds the row unbound, and must not answer it.
    await redis_client.set(redis_keys.evaluation_claim(req.event_id), "other-worker", px=1500)

    reply, _ = await service.answer(req)

    verdict = Verdict.from_json(reply)
    assert verdict.prohibited and verdict.reference_hash == req.reference_hash


async def test_an_ask_without_a_reference_hash_leaves_it_unbound_and_uncached(
    make_service: ServiceFactory, pg_pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    service = make_service(claim_ttl_seconds=5, wait_seconds=25)
    bound_ask = request("hello")
    await store_unbound(pg_pool, bound_ask.event_id)

    # Judged, but the stored refusal wins the insert: answered, not cached in Redis.
    reply, _ = await service.answer(dataclasses.replace(bound_ask, reference_hash=""))
    verdict = Verdict.from_json(reply)
    assert verdict.prohibited and verdict.reference_hash == ""
    assert not await redis_client.exists(redis_keys.verdict(bound_ask.event_id))

    reply, outcome = await service.answer(bound_ask)
    assert outcome == "cached_db"
    assert Verdict.from_json(reply).reference_hash == bound_ask.reference_hash

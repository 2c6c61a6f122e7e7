"""L2 from the gateway: the worker that took a verdict request died holding the event's
claim. The gateway asks again once the claim TTL has passed, and a live worker takes the
lapsed claim over and judges the event, within the same /sign request's timeout."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from tests.filters.filter_helpers import OWN_USER, message
from warden import redis_keys
from warden.bus.evaluation import EvaluationRequest
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import FILTER_WORKERS_QUEUE, HEADER_EVENT_ID
from warden.filters.base import FilterDeps
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher
from warden_gateway.errors import TemporarilyUnavailable
from warden_gateway.verdict_source import VerdictSource

CLAIM_TTL = 1.0


def reasks() -> float:
    return REGISTRY.get_sample_value("warden_verdict_reasks_total") or 0.0


def request() -> EvaluationRequest:
    event = message("hello")
    return EvaluationRequest(
        event_id=f"${uuid.uuid4().hex}",
        community_id="default",
        origin="origin.example",
        source="sign",
        reference_hash="refhash",
        pdu=orjson.dumps(event),
        event=event,
    )


async def _dying_worker(nats: NATS, subject: str, redis: aioredis.Redis) -> asyncio.Event:
    """A worker that claims the first event it is asked about, then dies (no reply, its
    claim left to lapse); set once that happened."""
    died = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        event_id = (msg.headers or {})[HEADER_EVENT_ID]
        await redis.set(
            redis_keys.evaluation_claim(event_id), "dead-worker", px=int(CLAIM_TTL * 1000)
        )
        await sub.unsubscribe()
        died.set()

    sub = await nats.subscribe(subject, queue=FILTER_WORKERS_QUEUE, cb=on_message)
    await nats.flush()
    return died


@pytest.mark.parametrize("reask", [True, False])
async def test_a_request_lost_with_a_dead_worker_is_asked_again_and_judged(
    reask: bool,
    nats_client: NATS,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    evaluate_subject: str,
) -> None:
    await ensure_verdicts_stream(nats_client.jetstream())
    died = await _dying_worker(nats_client, evaluate_subject, redis_client)
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
    live = EvaluationService(
        redis=redis_client,
        pool=pg_pool,
        pipeline=Pipeline(deps, timeout_seconds=1),
        configs=CommunityConfigCache(pg_pool, instance_defaults({})),
        writer=GroupCommitWriter(pg_pool),
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=CLAIM_TTL,
        wait_seconds=5,
    )
    source = VerdictSource(
        nats_client,
        timeout_seconds=4,
        subject=evaluate_subject,
        reask_after_seconds=CLAIM_TTL + 0.2 if reask else None,
    )
    req = request()
    before = reasks()
    try:
        lookup = asyncio.create_task(source.get(req))
        await asyncio.wait_for(died.wait(), 2)
        await live.start(nats_client, evaluate_subject)  # the worker left alive

        if not reask:  # as before: the lost request times out, 503
            with pytest.raises(TemporarilyUnavailable):
                await lookup
            return
        verdict = await lookup
    finally:
        await live.stop()

    assert not verdict.prohibited
    assert reasks() == before + 1
    stored = await get_verdict(pg_pool, req.event_id)
    assert stored is not None and not stored.prohibited

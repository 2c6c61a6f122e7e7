"""The openai_filter filter at the worker, with a real local moderation server.

A slow classifier holds up only the events it judges: other rooms' events are answered,
committed and cached while its request is held open. A failing classifier leaves no
verdict behind, and the event is judged once the service answers.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.filters.filter_helpers import OWN_USER, ROOM, event
from tests.filters.moderation_service import (
    OTHER_ROOM,
    ROOMS_ENV,
    Moderations,
    settings_for,
)
from tests.filters.moderation_service import service as service  # a fixture
from tests.local_servers import ThreadedServer
from warden import redis_keys
from warden.bus.evaluation import EvaluationRequest
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import HEADER_COMMUNITY, HEADER_EVENT_ID, HEADER_ORIGIN, HEADER_SOURCE
from warden.filters.base import FilterDeps
from warden.openai_moderation import OpenAIModeration
from warden.policy.config import instance_defaults
from warden.policy.harms import SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService, _Answer, _Event
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


@pytest.fixture
async def worker(
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    service: tuple[Moderations, ThreadedServer],
) -> AsyncIterator[EvaluationService]:
    await ensure_verdicts_stream(nats_client.jetstream())
    client = OpenAIModeration.from_settings(
        settings_for(service[1], openai_filter_max_concurrency=4)
    )
    assert client is not None
    deps = FilterDeps(
        redis=redis_client, pool=pg_pool, local_user_id=OWN_USER, openai_moderation=client
    )
    svc = EvaluationService(
        redis=redis_client,
        pool=pg_pool,
        pipeline=Pipeline(deps, timeout_seconds=30),
        configs=CommunityConfigCache(pg_pool, instance_defaults(ROOMS_ENV)),
        writer=GroupCommitWriter(pg_pool),
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=2,
        wait_seconds=60,
        store_timeout_seconds=5,
        # Only the classifier's own "waiting outside" may answer a batch early, or let
        # a batch arriving over NATS go without lingering.
        settle_early_seconds=600,
        linger_seconds=600,
    )
    yield svc
    if service[0].hold is not None:
        service[0].hold.set()
    await svc.stop()
    await client.aclose()


def request(body: str, room_id: str = ROOM) -> EvaluationRequest:
    return EvaluationRequest(
        event=event("m.room.message", {"msgtype": "m.text", "body": body}, room_id=room_id),
        event_id=f"${uuid.uuid4().hex}",
        community_id="default",
        origin="origin.example",
        source="sign",
    )


async def test_other_rooms_are_answered_while_the_classifier_holds_a_request(
    worker: EvaluationService,
    service: tuple[Moderations, ThreadedServer],
    pg_pool: asyncpg.Pool,
) -> None:
    moderations, _ = service
    moderations.hold = threading.Event()
    judged = request("is this fine")
    held = asyncio.create_task(worker.answer(judged))
    while moderations.held < 1:
        await asyncio.sleep(0.01)

    others = [request(f"message {i}", OTHER_ROOM) for i in range(10)]
    answers = await asyncio.gather(*(worker.answer(r) for r in others))
    for (reply, outcome), req in zip(answers, others, strict=True):
        assert outcome == "first_time"
        assert Verdict.from_json(reply).content_class is ContentClass.NEUTRAL
        assert await get_verdict(pg_pool, req.event_id) is not None

    # Every one of them was answered while the classifier still held its request.
    assert not held.done()
    assert moderations.held == 1
    moderations.hold.set()
    reply, outcome = await held
    assert outcome == "first_time"
    assert Verdict.from_json(reply).content_class is ContentClass.NEUTRAL


async def test_a_held_classifier_request_does_not_hold_the_rest_of_its_batch(
    worker: EvaluationService,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, _ = service
    moderations.hold = threading.Event()
    judged = request("is this fine")
    others = [request(f"message {i}", OTHER_ROOM) for i in range(5)]
    # One batch, as the worker forms it from requests arriving together.
    batch = {r.event_id: _Event(r) for r in [judged, *others]}
    answered: dict[str, _Answer] = {}
    others_answered = asyncio.Event()

    async def deliver(event_id: str, answer: _Answer) -> None:
        answered[event_id] = answer
        if all(r.event_id in answered for r in others):
            others_answered.set()

    batch_task = asyncio.create_task(worker._answer_events(batch, deliver))
    await asyncio.wait_for(others_answered.wait(), 15)
    assert judged.event_id not in answered
    assert moderations.held == 1
    for r in others:
        assert Verdict.from_json(answered[r.event_id].reply).content_class is ContentClass.NEUTRAL
    moderations.hold.set()
    await batch_task
    assert Verdict.from_json(answered[judged.event_id].reply).content_class is ContentClass.NEUTRAL


async def test_a_failing_classifier_leaves_no_verdict_and_is_asked_again(
    worker: EvaluationService,
    service: tuple[Moderations, ThreadedServer],
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
) -> None:
    moderations, _ = service
    moderations.status = 503
    req = request("buy followers cheap")

    reply, outcome = await worker.answer(req)
    assert outcome == "unavailable"
    assert orjson.loads(reply)["retry_after_ms"] > 0
    assert await get_verdict(pg_pool, req.event_id) is None
    assert not await redis_client.exists(redis_keys.verdict(req.event_id))

    # The service is back and flags it: the same event is refused now.
    moderations.status = 200
    moderations.flagged = True
    reply, outcome = await worker.answer(req)
    assert outcome == "first_time"
    verdict = Verdict.from_json(reply)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert verdict.harms == (SPAM,)
    assert len(moderations.received) == 2


async def test_a_batch_waiting_on_the_classifier_does_not_make_the_next_batches_linger(
    worker: EvaluationService,
    nats_client: NATS,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    # A worker gathers requests a moment longer when a batch is being answered; a batch
    # whose event waits on the classifier is not (with the fixture's linger of 600 s, a
    # request arriving meanwhile would otherwise wait that long).
    moderations, _ = service
    moderations.hold = threading.Event()
    subject = f"test.evaluate.{uuid.uuid4().hex}"
    await worker.start(nats_client, subject)

    async def ask(req: EvaluationRequest) -> bytes:
        headers = {
            HEADER_EVENT_ID: req.event_id,
            HEADER_COMMUNITY: req.community_id,
            HEADER_ORIGIN: req.origin,
            HEADER_SOURCE: req.source,
        }
        msg = await nats_client.request(
            subject, orjson.dumps(req.event), timeout=30, headers=headers
        )
        return msg.data

    held = asyncio.create_task(ask(request("is this fine")))
    while moderations.held < 1:
        await asyncio.sleep(0.01)
    other = request("another room", OTHER_ROOM)
    reply = await asyncio.wait_for(ask(other), 15)
    assert Verdict.from_json(reply).event_id == other.event_id
    assert not held.done()
    moderations.hold.set()
    assert Verdict.from_json(await held).content_class is ContentClass.NEUTRAL

"""The evaluation service in process: caches, claims, waiting on another worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.filters.filter_helpers import OWN_USER, message
from warden import redis_keys
from warden.bus.evaluation import BadRequest, EvaluationRequest, decode_request
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import (
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_REFERENCE_HASH,
    HEADER_SOURCE,
)
from warden.filters.base import FilterDeps
from warden.policy.config import instance_defaults
from warden.policy.harms import SPAM_FLOODING
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.settings import Settings
from warden.storage.verdicts import get_verdict, insert_verdicts
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


@dataclass
class Service:
    service: EvaluationService
    writer: GroupCommitWriter


def build_service(
    redis: aioredis.Redis, pool: asyncpg.Pool, nc: NATS, **kwargs: Any
) -> EvaluationService:
    """An evaluation service on the real servers, with the real pipeline."""
    deps = FilterDeps(redis=redis, pool=pool, local_user_id=OWN_USER)
    kwargs.setdefault("writer", GroupCommitWriter(pool))
    return EvaluationService(
        redis=redis,
        pool=pool,
        pipeline=Pipeline(deps, timeout_seconds=2),
        configs=CommunityConfigCache(pool, instance_defaults({})),
        publisher=VerdictPublisher(nc),
        claim_ttl_seconds=5,
        wait_seconds=0.5,
        **kwargs,
    )


@pytest.fixture
async def service(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, nats_client: NATS
) -> AsyncIterator[Service]:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    writer = GroupCommitWriter(pg_pool)
    svc = build_service(redis_client, pg_pool, nats_client, writer=writer)
    yield Service(svc, writer)
    await svc.stop()


def request(body: str = "hello", event_id: str | None = None) -> EvaluationRequest:
    return EvaluationRequest(
        event=message(body),
        event_id=event_id or f"${uuid.uuid4().hex}",
        community_id="default",
        origin="origin.example",
        source="sign",
        reference_hash="refhash",
    )


async def test_verdicts_stay_in_redis_for_the_configured_time(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    """PS_VERDICT_CACHE_SECONDS sets the Redis TTL of a verdict (an hour by default, see
    the next test); an older repeat is answered from PostgreSQL."""
    settings = Settings(verdict_cache_seconds=120)
    assert Settings().verdict_cache_seconds == 3600
    svc = build_service(
        redis_client, pg_pool, nats_client, verdict_cache_seconds=settings.verdict_cache_seconds
    )
    try:
        req = request("hello there")
        _, outcome = await svc.answer(req)
        assert outcome == "first_time"
        assert 60 < await redis_client.ttl(redis_keys.verdict(req.event_id)) <= 120
    finally:
        await svc.stop()
    with pytest.raises(ValueError, match="verdict_cache_seconds"):
        Settings(verdict_cache_seconds=59)


async def test_first_time_then_cached(service: Service, redis_client: aioredis.Redis) -> None:
    req = request("buy spam")
    reply, outcome = await service.service.answer(req)
    assert outcome == "first_time"
    v = Verdict.from_json(reply)
    assert v.content_class is ContentClass.PROHIBITED
    assert v.origin == "origin.example" and v.reference_hash == "refhash"
    assert v.community_id == "default" and v.event_id == req.event_id
    assert await redis_client.get(redis_keys.verdict(req.event_id)) == reply
    assert 3000 < await redis_client.ttl(redis_keys.verdict(req.event_id)) <= 3600  # an hour
    assert not await redis_client.exists(redis_keys.evaluation_claim(req.event_id))

    # Same event ID again, even with other content: the same verdict, from Redis...
    again, outcome = await service.service.answer(request("hello", req.event_id))
    assert (again, outcome) == (reply, "cached_redis")
    # ...and from PostgreSQL once Redis forgot it (then Redis has it again).
    await redis_client.delete(redis_keys.verdict(req.event_id))
    again, outcome = await service.service.answer(request("hello", req.event_id))
    assert (again, outcome) == (reply, "cached_db")
    assert await redis_client.get(redis_keys.verdict(req.event_id)) == reply


async def test_waits_for_the_claim_holder(
    service: Service, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    req = request("hello")
    await redis_client.set(redis_keys.evaluation_claim(req.event_id), "other-worker", px=5000)
    theirs = Verdict(
        event_id=req.event_id,
        content_class=ContentClass.PROHIBITED,
        harms=("org.matrix.msc4456.other",),
        room_id="!r:x",
        community_id="default",
        sender="@u:x",
        event_type="m.room.message",
        origin="someone",
        reference_hash="refhash",
        first_seen_ts=5,
    )

    async def other_worker_finishes() -> None:
        await asyncio.sleep(0.1)
        stored = (await insert_verdicts(pg_pool, [theirs]))[req.event_id]
        await redis_client.set(redis_keys.verdict(req.event_id), stored.to_json())

    finishing = asyncio.create_task(other_worker_finishes())
    reply, outcome = await service.service.answer(req)
    await finishing
    assert outcome == "waited"
    assert Verdict.from_json(reply).to_json() == theirs.to_json()  # not re-evaluated


async def test_gives_up_waiting_then_takes_over_a_lapsed_claim(
    service: Service, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    req = request("hello")
    claim = redis_keys.evaluation_claim(req.event_id)
    await redis_client.set(claim, "stuck-worker", px=5000)
    reply, outcome = await service.service.answer(req)
    assert outcome == "error" and "error" in orjson.loads(reply)
    assert await get_verdict(pg_pool, req.event_id) is None  # nothing was judged

    # The stuck worker's claim lapses (it died): the next request evaluates.
    await redis_client.pexpire(claim, 50)
    reply, outcome = await service.service.answer(req)
    assert outcome == "first_time"
    assert Verdict.from_json(reply).content_class is ContentClass.NEUTRAL


async def test_unknown_community_is_an_error_reply(service: Service) -> None:
    req = EvaluationRequest(event=message("x"), event_id="$e1", community_id="nope")
    reply, outcome = await service.service.answer(req)
    assert outcome == "error" and "unknown community" in orjson.loads(reply)["error"]


def test_decode_request_rejects_bad_input() -> None:
    ok = {HEADER_EVENT_ID: "$e", HEADER_COMMUNITY: "default"}
    assert decode_request(b'{"type":"m.room.message"}', ok).event_id == "$e"
    full = {**ok, HEADER_ORIGIN: "o", HEADER_SOURCE: "sign", HEADER_REFERENCE_HASH: "h"}
    parsed = decode_request(b"{}", full)
    assert (parsed.origin, parsed.source, parsed.reference_hash) == ("o", "sign", "h")
    for body, headers in [
        (b"not json", ok),
        (b"[1,2]", ok),
        (b"{}", None),
        (b"{}", {HEADER_EVENT_ID: "$e"}),
        (b"{}", {HEADER_COMMUNITY: "default"}),
    ]:
        with pytest.raises(BadRequest):
            decode_request(body, headers)


async def test_only_refusals_carry_a_body_excerpt(
    service: Service, nats_client: NATS, pg_pool: asyncpg.Pool
) -> None:
    from tests.filter_worker.test_worker_processes import stream_messages_for, verdict_stream_marks

    js = nats_client.jetstream()
    first_seq = await verdict_stream_marks(js)
    neutral, spam = request("just saying hello"), request("buy spam today")
    await service.service.answer(neutral)
    await service.service.answer(spam)
    (n,) = await stream_messages_for(nats_client, first_seq, neutral.event_id)
    (s,) = await stream_messages_for(nats_client, first_seq, spam.event_id)
    assert orjson.loads(n.data)["extra"] == {"source": "sign"}
    assert orjson.loads(s.data)["extra"] == {"source": "sign", "body_excerpt": "buy spam today"}
    # Nor is the neutral content kept in the outbox column meanwhile.
    stored = await pg_pool.fetchval(
        "SELECT outbox_extra FROM verdicts WHERE event_id = $1", neutral.event_id
    )
    assert stored is None or "body_excerpt" not in orjson.loads(stored)


async def test_the_hellban_is_read_by_the_claiming_script(
    service: Service, redis_client: aioredis.Redis
) -> None:
    """The look-up script that claims a batch's events also reads each sender's hellban,
    so the hellban prefilter sends Redis nothing of its own: a banned sender is refused
    (spam.flooding), another is not, and neither asks Redis ``EXISTS`` per event."""
    svc = service.service
    deps = svc._pipeline.deps
    sent: list[str] = []
    forward = deps.auto_pipeline.execute_command

    async def recording(*args: object) -> object:
        sent.append(str(args[0]))
        return await forward(*args)

    deps.auto_pipeline.execute_command = recording  # type: ignore[method-assign]
    banned, fine = request("hello there"), request("hello again")
    banned.event["sender"] = f"@banned{uuid.uuid4().hex[:8]}:example.org"
    await redis_client.set(redis_keys.hellban("default", banned.event["sender"]), b"1", ex=60)
    try:
        (banned_reply, _), (fine_reply, _) = await svc.answer_many([banned, fine])
        refused, signed = Verdict.from_json(banned_reply), Verdict.from_json(fine_reply)
        assert refused.content_class is ContentClass.PROHIBITED
        assert refused.harms == (SPAM_FLOODING,)
        by_name = {f.name: f for f in refused.filters}
        assert by_name["hellban_prefilter"].content_class is ContentClass.PROHIBITED
        assert signed.content_class is not ContentClass.PROHIBITED
        assert "EXISTS" not in sent, sent
    finally:
        await redis_client.delete(redis_keys.hellban("default", banned.event["sender"]))

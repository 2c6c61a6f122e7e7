"""Requests answered together: one Redis look and one settle per batch, one PostgreSQL
lookup, one evaluation per event ID, and JetStream publication after the reply."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
import nats
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from prometheus_client import REGISTRY

from tests.conftest import NATS_URL, REDIS_URL
from tests.filter_worker.test_evaluation_dedup import request
from tests.filter_worker.test_worker_processes import (
    TRACE_ID,
    stream_messages_for,
    verdict_stream_marks,
)
from tests.filters.filter_helpers import OWN_USER, event, message
from warden import redis_keys
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import (
    EVALUATE_SUBJECT,
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_SOURCE,
)
from warden.filters.base import FilterDeps
from warden.filters.hellban_store import HellbanStore
from warden.policy.config import instance_defaults
from warden.policy.harms import OTHER, SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage.redis_autopipeline import RedisAutoPipeline
from warden.storage.verdicts import get_verdict, insert_verdicts
from warden.telemetry import tracing
from warden_filter_worker import evaluation
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter, InsertFn
from warden_filter_worker.outbox import OutboxSweeper, PublishedMarker
from warden_filter_worker.publisher import VerdictPublisher


class CountingRedis(aioredis.Redis):
    """A real Redis client that records each command once its round trip is over."""

    commands: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)
        finally:
            self.commands.append(str(args[0]).upper())


class CountingPool:
    """A real asyncpg pool that counts the queries made through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.pool, name)
        if name in {"fetch", "fetchrow", "fetchval", "execute"}:
            self.queries += 1
        return attr


class CountingPipeline(Pipeline):
    """The real pipeline, noting each event ID it evaluates."""

    evaluated: list[str]

    async def evaluate(self, event: dict[str, Any], **kwargs: Any) -> Verdict:
        self.evaluated.append(kwargs["event_id"])
        return await super().evaluate(event, **kwargs)


class Worker:
    def __init__(
        self,
        service: EvaluationService,
        redis: CountingRedis,
        pool: CountingPool,
        pipeline: CountingPipeline,
        publisher: VerdictPublisher,
    ) -> None:
        self.service, self.redis, self.pool = service, redis, pool
        self.pipeline, self.publisher = pipeline, publisher

    def reset_counts(self) -> None:
        self.redis.commands.clear()
        self.pool.queries = 0
        self.pipeline.evaluated.clear()


@pytest.fixture
async def make_worker(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, nats_client: NATS
) -> AsyncIterator[Callable[..., Any]]:
    """Build evaluation services on real Redis, PostgreSQL and NATS; stopped after."""
    await ensure_verdicts_stream(nats_client.jetstream())
    made: list[tuple[EvaluationService, CountingRedis]] = []

    async def factory(
        *,
        publisher: VerdictPublisher | None = None,
        insert: InsertFn | None = None,
        wait_seconds: float = 5,
        redis_type: type[CountingRedis] = CountingRedis,
    ) -> Worker:
        counting = redis_type.from_url(REDIS_URL)
        counting.commands = []
        pipeline = CountingPipeline(
            FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER),
            timeout_seconds=2,
        )
        pipeline.evaluated = []
        pool = CountingPool(pg_pool)
        publisher = publisher or VerdictPublisher(nats_client)
        writer = (
            GroupCommitWriter(pg_pool)
            if insert is None
            else GroupCommitWriter(pg_pool, insert=insert)
        )
        service = EvaluationService(
            redis=counting,
            pool=pool,  # type: ignore[arg-type]
            pipeline=pipeline,
            configs=CommunityConfigCache(pg_pool, instance_defaults({})),
            writer=writer,
            publisher=publisher,
            claim_ttl_seconds=10,
            wait_seconds=wait_seconds,
        )
        made.append((service, counting))
        worker = Worker(service, counting, pool, pipeline, publisher)
        # Load the scripts, so every later command counted is one the batch needed, and
        # see the warm-up's publication through.
        await service.answer(request("warm up"))
        await publisher.close()
        worker.reset_counts()
        return worker

    yield factory
    for service, counting in made:
        await service.stop()
        await counting.aclose()


def harm_count(harm: str) -> float:
    return REGISTRY.get_sample_value("warden_verdict_harms_total", {"harm": harm}) or 0.0


def outcome_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value("warden_evaluations_total", {"outcome": outcome})
    return value or 0.0


async def test_duplicates_in_a_batch_share_one_evaluation_and_two_redis_round_trips(
    make_worker: Callable[..., Any], redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    worker: Worker = await make_worker()
    event_ids = [f"${uuid.uuid4().hex}" for _ in range(12)]
    requests = [
        request("buy spam" if i % 4 == 0 else f"hello {i}", event_id)
        for i, event_id in enumerate(event_ids)
        for _ in range(3)
    ]
    random.Random(7).shuffle(requests)
    spam_harms = harm_count(SPAM)

    replies = await worker.service.answer_many(requests)

    # One evaluation per event ID; every duplicate has the same bytes.
    assert sorted(worker.pipeline.evaluated) == sorted(event_ids)
    by_event: dict[str, set[bytes]] = {}
    outcomes: dict[str, list[str]] = {}
    for req, (reply, outcome) in zip(requests, replies, strict=True):
        by_event.setdefault(req.event_id, set()).add(reply)
        outcomes.setdefault(req.event_id, []).append(outcome)
    for event_id in event_ids:
        (reply,) = by_event[event_id]
        assert Verdict.from_json(reply).event_id == event_id
        assert outcomes[event_id] == ["first_time", "waited", "waited"]
        assert await redis_client.get(redis_keys.verdict(event_id)) == reply
        assert not await redis_client.exists(redis_keys.evaluation_claim(event_id))
        stored = await get_verdict(pg_pool, event_id)
        assert stored is not None and stored.to_json() == reply

    # Round trips: one Redis look and one settle for the whole batch, one PostgreSQL
    # lookup (the group-commit writer has its own pool), not one of each per event.
    assert worker.redis.commands == ["EVALSHA", "EVALSHA"]
    assert worker.pool.queries == 1
    # The three spam events are counted by harm once each (not their duplicates).
    assert harm_count(SPAM) - spam_harms == 3


async def test_a_batch_mixing_every_kind_of_event(
    make_worker: Callable[..., Any], redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    worker: Worker = await make_worker()
    in_redis, in_db = request("hello from redis"), request("buy spam from the database")
    before = {r.event_id: (await worker.service.answer(r))[0] for r in (in_redis, in_db)}
    await redis_client.delete(redis_keys.verdict(in_db.event_id))  # Redis lost it
    new = request("something new")
    held = request("someone else is on it")
    claim = redis_keys.evaluation_claim(held.event_id)
    await redis_client.set(claim, "other-worker", px=10_000)
    theirs = Verdict(
        event_id=held.event_id,
        content_class=ContentClass.PROHIBITED,
        harms=(OTHER,),
        room_id="!r:x",
        community_id="default",
        sender="@u:x",
        event_type="m.room.message",
        origin="someone",
        reference_hash="refhash",
        first_seen_ts=5,
    )
    worker.reset_counts()

    async def other_worker_finishes() -> None:
        while "EVALSHA" not in worker.redis.commands:  # our batch has looked
            await asyncio.sleep(0.001)
        stored = (await insert_verdicts(pg_pool, [theirs]))[held.event_id]
        await redis_client.set(redis_keys.verdict(held.event_id), stored.to_json())

    finishing = asyncio.create_task(other_worker_finishes())
    replies = await worker.service.answer_many([in_redis, in_db, new, held])
    await finishing

    outcomes = [outcome for _, outcome in replies]
    assert outcomes == ["cached_redis", "cached_db", "first_time", "waited"]
    assert replies[0][0] == before[in_redis.event_id]
    assert replies[1][0] == before[in_db.event_id]
    assert Verdict.from_json(replies[2][0]).event_id == new.event_id
    assert replies[3][0] == theirs.to_json()
    assert worker.pipeline.evaluated == [new.event_id]  # nothing else was judged again
    # The stored one is cached again, the new one cached; our claims are released and
    # the other worker's claim is left alone.
    assert await redis_client.get(redis_keys.verdict(in_db.event_id)) == replies[1][0]
    assert await redis_client.get(redis_keys.verdict(new.event_id)) == replies[2][0]
    for r in (in_db, new):
        assert not await redis_client.exists(redis_keys.evaluation_claim(r.event_id))
    assert await redis_client.get(claim) == b"other-worker"


async def test_the_reply_does_not_wait_for_jetstream(
    make_worker: Callable[..., Any], nats_client: NATS, pg_pool: asyncpg.Pool
) -> None:
    js = nats_client.jetstream()
    first_seq = await verdict_stream_marks(js)
    acked: list[str] = []
    worker: Worker = await make_worker(
        publisher=VerdictPublisher(nats_client, on_published=acked.append)
    )
    acked.clear()  # the warm-up's
    req = request("buy spam now")

    reply, outcome = await worker.service.answer(req)

    # Replied before the publication was even attempted...
    assert outcome == "first_time"
    assert acked == [] and worker.publisher.pending == 1
    # ...which then goes out with its extras, once, and is reported to the outbox marker.
    await worker.publisher.close()
    assert acked == [req.event_id]
    (published,) = await stream_messages_for(nats_client, first_seq, req.event_id)
    on_stream = orjson.loads(published.data)
    assert on_stream["extra"] == {"source": "sign", "body_excerpt": "buy spam now"}
    del on_stream["extra"]
    assert orjson.dumps(on_stream) == reply  # the same verdict; the reply carries no extras


async def test_a_failing_jetstream_leaves_the_verdict_to_the_outbox_sweeper(
    make_worker: Callable[..., Any], nats_client: NATS, pg_pool: asyncpg.Pool
) -> None:
    broken = await nats.connect(NATS_URL)
    await broken.close()  # every publish through it fails
    marker = PublishedMarker(pg_pool)
    worker: Worker = await make_worker(
        publisher=VerdictPublisher(broken, retry_budget_seconds=0.3, on_published=marker.add)
    )
    failed = REGISTRY.get_sample_value("warden_verdict_publish_failures_total", {"final": "false"})
    req = request("buy spam again")

    reply, outcome = await worker.service.answer(req)

    assert outcome == "first_time" and Verdict.from_json(reply).prohibited
    # Not attempted yet when the reply is ready.
    assert (
        REGISTRY.get_sample_value("warden_verdict_publish_failures_total", {"final": "false"})
        == failed
    )
    await worker.service.stop()  # flushes the publication: it fails, retries, gives up
    assert REGISTRY.get_sample_value(
        "warden_verdict_publish_failures_total", {"final": "false"}
    ) > (failed or 0)
    await marker.flush()
    published = await pg_pool.fetchval(
        "SELECT published FROM verdicts WHERE event_id = $1", req.event_id
    )
    assert published is False

    # The sweeper publishes it.
    js = nats_client.jetstream()
    first_seq = await verdict_stream_marks(js)
    sweeper = OutboxSweeper(
        pg_pool, VerdictPublisher(nats_client).publish_now, interval_seconds=1, min_age_seconds=0
    )
    while await sweeper.sweep_once():
        pass
    (message_,) = await stream_messages_for(nats_client, first_seq, req.event_id)
    assert orjson.loads(message_.data)["extra"]["body_excerpt"] == "buy spam again"
    assert await pg_pool.fetchval(
        "SELECT published FROM verdicts WHERE event_id = $1", req.event_id
    )


class WatchingRedis(CountingRedis):
    """Notes, each time a script's round trip is over, how many PostgreSQL queries the
    worker had started by then."""

    pool: CountingPool | None = None
    queries_when_scripted: list[int]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)
        finally:
            if self.pool is not None and str(args[0]).upper() == "EVALSHA":
                self.queries_when_scripted.append(self.pool.queries)


async def test_the_stored_verdicts_are_read_while_redis_answers(
    make_worker: Callable[..., Any],
) -> None:
    """A new event waits for the slower of the Redis look and the PostgreSQL read, not
    for one after the other: the read is under way before the look's answer is in."""
    worker: Worker = await make_worker(redis_type=WatchingRedis)
    redis = worker.redis
    assert isinstance(redis, WatchingRedis)
    redis.queries_when_scripted = []
    redis.pool = worker.pool
    _, outcome = await worker.service.answer(request("hello", f"${uuid.uuid4().hex}"))
    assert outcome == "first_time"
    # The look (first script), then the settle; one read in all, sent before the look's
    # answer came back.
    assert redis.queries_when_scripted[0] == 1
    assert worker.pool.queries == 1


async def test_events_redis_answers_for_leave_the_rows_read_for_them_unused(
    make_worker: Callable[..., Any],
) -> None:
    """The read goes out for every event of a batch; those Redis answers for are answered
    from Redis and judged by nobody."""
    worker: Worker = await make_worker()
    cached = [request(f"hello {i}") for i in range(3)]
    first = await worker.service.answer_many(cached)
    worker.reset_counts()
    again = await worker.service.answer_many(cached)
    assert [o for _, o in again] == ["cached_redis"] * 3
    assert [r for r, _ in again] == [r for r, _ in first]
    assert worker.pool.queries == 1 and worker.pipeline.evaluated == []


async def test_a_lapsed_claimer_that_committed_first_wins(
    make_worker: Callable[..., Any], pg_pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    event_id = f"${uuid.uuid4().hex}"
    theirs = Verdict(
        event_id=event_id,
        content_class=ContentClass.ALLOWED,
        room_id="!r:x",
        community_id="default",
        sender="@u:x",
        event_type="m.room.message",
        origin="the-lapsed-worker",
        reference_hash="refhash",  # the same event as ours: only an unbound row is not cached
        first_seen_ts=9,
    )

    async def racing(pool: asyncpg.Pool, batch: Sequence[Verdict]) -> dict[str, Verdict]:
        # Between our lookup and our commit, a worker whose claim had lapsed commits.
        if any(v.event_id == event_id for v in batch):
            await insert_verdicts(pool, [theirs])
        return await insert_verdicts(pool, batch)

    worker: Worker = await make_worker(insert=racing)
    reply, outcome = await worker.service.answer(request("hello", event_id))
    assert outcome == "cached_db"
    assert reply == theirs.to_json()
    assert await redis_client.get(redis_keys.verdict(event_id)) == reply
    assert worker.publisher.pending == 0  # theirs, not ours, to publish


async def test_a_verdict_read_back_from_the_table_is_still_ours(
    make_worker: Callable[..., Any], pg_pool: asyncpg.Pool
) -> None:
    async def reading_back(pool: asyncpg.Pool, batch: Sequence[Verdict]) -> dict[str, Verdict]:
        await insert_verdicts(pool, batch)
        rows = {v.event_id: await get_verdict(pool, v.event_id) for v in batch}
        return {k: v for k, v in rows.items() if v is not None}

    worker: Worker = await make_worker(insert=reading_back)
    reply, outcome = await worker.service.answer(request("buy spam", f"${uuid.uuid4().hex}"))
    # No extras and rounded durations in the row, yet the verdict is the one we made.
    assert outcome == "first_time" and Verdict.from_json(reply).prohibited
    assert worker.publisher.pending == 1


async def test_requests_over_nats_are_answered_each_once(
    make_worker: Callable[..., Any], nats_client: NATS, pg_pool: asyncpg.Pool
) -> None:
    worker: Worker = await make_worker()
    js = nats_client.jetstream()
    first_seq = await verdict_stream_marks(js)
    counts = {o: outcome_count(o) for o in ("first_time", "waited", "cached_redis", "error")}
    await worker.service.start(nats_client)
    event_ids = [f"${uuid.uuid4().hex}" for _ in range(8)]

    async def ask(event_id: str, body: bytes) -> Any:
        hdrs = {
            HEADER_EVENT_ID: event_id,
            HEADER_COMMUNITY: "default",
            HEADER_ORIGIN: "origin.example",
            HEADER_SOURCE: "sign",
        }
        return await nats_client.request(EVALUATE_SUBJECT, body, timeout=20, headers=hdrs)

    asks = [ask(e, orjson.dumps(message(f"hi {e}"))) for e in event_ids for _ in range(3)]
    asks.append(ask(f"${uuid.uuid4().hex}", b"not json"))
    *replies, bad = await asyncio.gather(*asks)

    assert "error" in orjson.loads(bad.data)
    for i, event_id in enumerate(event_ids):
        same = {r.data for r in replies[3 * i : 3 * i + 3]}
        assert len(same) == 1
        assert Verdict.from_json(same.pop()).event_id == event_id
    # The request's headers are not echoed back: the gateway reads only the body.
    assert all(not r.headers for r in replies)
    assert sorted(worker.pipeline.evaluated) == sorted(event_ids)
    await worker.service.stop()  # flushes the publications
    for event_id in event_ids:
        assert len(await stream_messages_for(nats_client, first_seq, event_id)) == 1
    delta = {o: outcome_count(o) - n for o, n in counts.items()}
    assert delta["first_time"] == 8 and delta["error"] == 1
    assert delta["waited"] + delta["cached_redis"] == 16


class HeldSettleRedis(CountingRedis):
    """Once armed, holds the second script call (a batch's settle: cache the verdicts and
    release the claims, after the look) until ``release`` is set."""

    armed = False
    scripts = 0
    release: asyncio.Event

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.armed and str(args[0]).upper() == "EVALSHA":
            self.scripts += 1
            if self.scripts == 2:
                await self.release.wait()
        return await super().execute_command(*args, **options)


async def test_the_reply_does_not_wait_for_the_redis_cache_write(
    make_worker: Callable[..., Any],
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
) -> None:
    worker: Worker = await make_worker(redis_type=HeldSettleRedis)  # scripts loaded
    held = worker.redis
    assert isinstance(held, HeldSettleRedis)
    held.release = asyncio.Event()
    held.armed = True
    await worker.service.start(nats_client)
    event_id = f"${uuid.uuid4().hex}"
    try:
        hdrs = {
            HEADER_EVENT_ID: event_id,
            HEADER_COMMUNITY: "default",
            HEADER_ORIGIN: "origin.example",
            HEADER_SOURCE: "sign",
        }
        body = orjson.dumps(message("hello"))
        # Answered while the settle is held: the verdict is durable in PostgreSQL, not
        # yet in Redis, and the claim is still ours.
        msg = await nats_client.request(EVALUATE_SUBJECT, body, timeout=5, headers=hdrs)
        assert Verdict.from_json(msg.data).event_id == event_id
        stored = await get_verdict(pg_pool, event_id)
        assert stored is not None and stored.to_json() == msg.data
        assert held.scripts == 2 and not held.release.is_set()
        assert await redis_client.get(redis_keys.verdict(event_id)) is None
        assert await redis_client.exists(redis_keys.evaluation_claim(event_id))
        # Then the settle goes through: cached for later requests, claim released.
        held.release.set()
        async with asyncio.timeout(5):
            while await redis_client.get(redis_keys.verdict(event_id)) != msg.data:
                await asyncio.sleep(0.01)
        assert not await redis_client.exists(redis_keys.evaluation_claim(event_id))
    finally:
        held.release.set()  # the fixture's stop waits for the batch


class HeldBans(HellbanStore):
    """The real hellban store on the real Redis; each ban waits for ``release`` first."""

    def __init__(self, auto_pipeline: RedisAutoPipeline) -> None:
        super().__init__(auto_pipeline)
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def ban(self, community_id: str, sender: str, seconds: int) -> None:
        self.started.append(sender)
        await self.release.wait()
        await super().ban(community_id, sender, seconds)


async def test_a_refusal_commits_with_its_batch_while_its_hellban_is_written(
    make_worker: Callable[..., Any], redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    """The hellban postfilter starts the ban's Redis write without waiting for it: the
    refusal's verdict commits with the rest of its batch while the write is out, and
    the batch is answered once both are done. Waiting in the filter held the refusal's
    verdict, and so its whole batch, one Redis round trip before the commit (4.4 ms on
    average in ``make bench``'s mixed window), and split the batch into two commits."""
    worker: Worker = await make_worker()
    deps = worker.pipeline.deps
    bans = HeldBans(deps.auto_pipeline)
    deps.hellbans = bans
    spammer = f"@spammer{uuid.uuid4().hex[:8]}:example.org"
    spam = request("buy spam")
    spam = dataclasses.replace(
        spam,
        event=event("m.room.message", {"msgtype": "m.text", "body": "buy spam"}, sender=spammer),
    )
    neutral = [request(f"hello {i}") for i in range(5)]
    commits = batch_commits()

    answering = asyncio.create_task(worker.service.answer_many([spam, *neutral]))
    try:
        async with asyncio.timeout(5):
            while await get_verdict(pg_pool, spam.event_id) is None:
                await asyncio.sleep(0.005)
        # Committed while the ban is held, in one statement with the batch's others.
        assert bans.started == [spammer] and not bans.release.is_set()
        assert batch_commits() == commits + 1
        for r in neutral:
            assert await get_verdict(pg_pool, r.event_id) is not None
        # Nobody is answered before the ban is written.
        await asyncio.sleep(0.05)
        assert not answering.done()
        assert not await redis_client.exists(redis_keys.hellban("default", spammer))
    finally:
        bans.release.set()
    replies = await answering
    assert Verdict.from_json(replies[0][0]).prohibited
    assert [outcome for _, outcome in replies] == ["first_time"] * 6
    assert await redis_client.exists(redis_keys.hellban("default", spammer))


def batch_commits() -> float:
    return REGISTRY.get_sample_value("warden_verdict_batch_size_count") or 0.0


async def test_requests_arriving_while_a_batch_is_answered_wait_to_share_the_next(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    # The first request's commit is held, so its batch stays in flight; three requests
    # sent apart meanwhile form one batch when the linger ends, not three.
    committing = asyncio.Event()
    release = asyncio.Event()

    async def held_insert(pool: asyncpg.Pool, verdicts: Sequence[Verdict]) -> Any:
        committing.set()
        await release.wait()
        return await insert_verdicts(pool, verdicts)

    await ensure_verdicts_stream(nats_client.jetstream())
    counting = CountingRedis.from_url(REDIS_URL)
    counting.commands = []
    pool = CountingPool(pg_pool)
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
    service = EvaluationService(
        redis=counting,
        pool=pool,  # type: ignore[arg-type]
        pipeline=Pipeline(deps, timeout_seconds=2),
        configs=CommunityConfigCache(pg_pool, instance_defaults({})),
        writer=GroupCommitWriter(pg_pool, insert=held_insert),
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=10,
        wait_seconds=5,
        linger_seconds=0.3,
    )
    sizes = batch_metric("warden_evaluation_batch_size")
    waits = batch_metric("warden_evaluation_queue_seconds")
    await service.start(nats_client)
    try:

        async def ask(text: str) -> bytes:
            hdrs = {
                HEADER_EVENT_ID: f"${uuid.uuid4().hex}",
                HEADER_COMMUNITY: "default",
                HEADER_ORIGIN: "origin.example",
                HEADER_SOURCE: "sign",
            }
            body = orjson.dumps(message(text))
            msg = await nats_client.request(EVALUATE_SUBJECT, body, timeout=10, headers=hdrs)
            return msg.data

        first = asyncio.create_task(ask("first"))
        await asyncio.wait_for(committing.wait(), 5)
        later = []
        for i in range(3):
            later.append(asyncio.create_task(ask(f"later {i}")))
            await asyncio.sleep(0.05)  # apart: separate loop iterations on the worker
        await asyncio.sleep(0.4)  # past the linger: the second batch has started
        release.set()
        replies = await asyncio.gather(first, *later)
    finally:
        await service.stop()
        await counting.aclose()
    assert all(Verdict.from_json(r).content_class is ContentClass.NEUTRAL for r in replies)
    # One PostgreSQL lookup per batch: the first request's, then one for the three.
    assert pool.queries == 2
    # Two batches, of one and three requests; the three waited for the linger (0.3 s)
    # from the first one's arrival.
    count, total = batch_metric("warden_evaluation_batch_size")
    assert (count - sizes[0], total - sizes[1]) == (2, 4)
    count, total = batch_metric("warden_evaluation_queue_seconds")
    assert count - waits[0] == 4
    assert total - waits[1] >= 0.25


def batch_metric(name: str) -> tuple[float, float]:
    """A histogram's count and sum."""
    count = REGISTRY.get_sample_value(f"{name}_count") or 0.0
    return count, REGISTRY.get_sample_value(f"{name}_sum") or 0.0


@pytest.mark.parametrize("exporting", [False, True])
async def test_a_worker_makes_its_span_for_a_request_only_when_exporting(
    make_worker: Callable[..., Any],
    nats_client: NATS,
    monkeypatch: pytest.MonkeyPatch,
    exporting: bool,
) -> None:
    # Without an exporter nobody reads the worker's span, which cost ~6 µs a request;
    # the gateway's trace context must reach the verdict's publication either way.
    provider = TracerProvider(sampler=ALWAYS_ON)
    finished = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(finished))
    monkeypatch.setattr(evaluation, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_exporting", exporting)
    worker: Worker = await make_worker()
    await worker.service.start(nats_client)
    marks = await verdict_stream_marks(nats_client.jetstream())
    event_id = f"${uuid.uuid4().hex}"
    hdrs = {
        HEADER_EVENT_ID: event_id,
        HEADER_COMMUNITY: "default",
        HEADER_ORIGIN: "origin.example",
        HEADER_SOURCE: "sign",
        "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    }
    body = orjson.dumps(message("buy spam"))
    msg = await nats_client.request(EVALUATE_SUBJECT, body, timeout=5, headers=hdrs)
    assert Verdict.from_json(msg.data).content_class is ContentClass.PROHIBITED
    async with asyncio.timeout(5):
        while not (published := await stream_messages_for(nats_client, marks, event_id)):
            await asyncio.sleep(0.02)
    assert TRACE_ID in published[0].headers["traceparent"]
    names = [span.name for span in finished.get_finished_spans()]
    assert names.count("filter-worker.evaluate") == (1 if exporting else 0)


async def test_refusals_are_logged_at_info_and_other_verdicts_at_debug(
    make_worker: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    worker: Worker = await make_worker()

    def verdict_lines() -> dict[str, logging.LogRecord]:
        return {
            str(r.__dict__["event_id"]): r
            for r in caplog.records
            if r.name == evaluation.__name__ and r.getMessage() == "verdict"
        }

    # At DEBUG every verdict has its line, a neutral one too.
    neutral = request("hello there")
    with caplog.at_level(logging.DEBUG, logger=evaluation.__name__):
        await worker.service.answer_many([neutral])
    lines = verdict_lines()
    assert set(lines) == {neutral.event_id}
    assert lines[neutral.event_id].levelno == logging.DEBUG
    assert lines[neutral.event_id].__dict__["class"] == "neutral"

    # At INFO only the refusal does.
    caplog.clear()
    other, refused = request("hello again"), request("buy spam now")
    other.event["sender"] = "@someone.else:example.org"  # not hellbanned by the refusal
    with caplog.at_level(logging.INFO, logger=evaluation.__name__):
        replies = await worker.service.answer_many([other, refused])
    assert [Verdict.from_json(r).content_class for r, _ in replies] == [
        ContentClass.NEUTRAL,
        ContentClass.PROHIBITED,
    ]
    lines = verdict_lines()
    assert set(lines) == {refused.event_id}
    line = lines[refused.event_id]
    assert line.levelno == logging.INFO
    assert line.__dict__["class"] == "prohibited" and line.__dict__["harms"] == [SPAM]
    assert line.__dict__["origin"] == refused.origin  # the server that asked first

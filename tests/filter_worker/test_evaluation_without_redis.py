"""Redis down (M6): the worker judges with PostgreSQL alone and still gives one verdict
per event; a Redis that comes back is used again without a restart. Also L2's pause: a
holder that stops renewing its claim and finishes after another worker took it over
replies the stored verdict, not its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from tests.filters.filter_helpers import OWN_USER, message
from tests.private_redis import PrivateRedis
from tests.service_processes import free_port
from warden import redis_keys
from warden.bus.evaluation import EvaluationRequest
from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.filters.registry import FILTERS
from warden.policy.config import instance_defaults
from warden.policy.harms import SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher

# No hellban: its filters keep their state in Redis and cannot judge without it.
NO_REDIS_FILTERS = {"PS_HELLBAN_POSTFILTER_MINUTES": "0"}


class Flip(Filter):
    """Alternates: refuses on its 1st, 3rd... run and passes on the others, after a pause,
    so two concurrent evaluations of one event would give different verdicts."""

    name = "test_flip"
    group = Group.MAIN
    harm_ids = (SPAM,)
    runs = 0
    seconds = 0.3

    async def check(self, ctx: FilterContext) -> FilterResult:
        Flip.runs += 1
        prohibited = Flip.runs % 2 == 1
        await asyncio.sleep(Flip.seconds)
        return FilterResult.prohibited(SPAM) if prohibited else FilterResult.neutral()


def fallbacks() -> float:
    return REGISTRY.get_sample_value("warden_redis_fallbacks_total", {"use": "claims"}) or 0.0


def request(body: str = "hello") -> EvaluationRequest:
    return EvaluationRequest(
        event=message(body),
        event_id=f"${uuid.uuid4().hex}",
        community_id="default",
        origin="origin.example",
        source="sign",
        reference_hash="refhash",
    )


ServiceFactory = Callable[..., EvaluationService]


@pytest.fixture
async def make_service(pg_pool: asyncpg.Pool, nats_client: NATS) -> AsyncIterator[ServiceFactory]:
    await ensure_verdicts_stream(nats_client.jetstream())
    services: list[EvaluationService] = []
    clients: list[aioredis.Redis] = []

    def make(
        redis_url: str, *, flip: bool = False, claim_ttl_seconds: float = 2, wait: float = 5
    ) -> Any:
        redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=0.5)
        clients.append(redis)
        deps = FilterDeps(redis=redis, pool=pg_pool, local_user_id=OWN_USER)
        service = EvaluationService(
            redis=redis,
            pool=pg_pool,
            pipeline=Pipeline(
                deps, timeout_seconds=5, filters=(*FILTERS, Flip) if flip else FILTERS
            ),
            configs=CommunityConfigCache(pg_pool, instance_defaults(NO_REDIS_FILTERS)),
            writer=GroupCommitWriter(pg_pool),
            publisher=VerdictPublisher(nats_client),
            claim_ttl_seconds=claim_ttl_seconds,
            wait_seconds=wait,
            store_timeout_seconds=2,
        )
        services.append(service)
        return service

    yield make
    for service in services:
        await service.stop()
    for client in clients:
        await client.aclose()


@pytest.fixture
def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    server.stop()


async def test_redis_down_the_worker_judges_with_postgresql(
    make_service: ServiceFactory, dead_redis_url: str, pg_pool: asyncpg.Pool
) -> None:
    service = make_service(dead_redis_url)
    before = fallbacks()
    spam, plain = request("buy spam now, cheap pills"), request("hello")

    (spam_reply, spam_outcome), (plain_reply, plain_outcome) = await service.answer_many(
        [spam, plain]
    )

    assert (spam_outcome, plain_outcome) == ("first_time", "first_time"), plain_reply
    for req, reply in ((spam, spam_reply), (plain, plain_reply)):
        stored = await get_verdict(pg_pool, req.event_id)
        assert stored is not None and Verdict.from_json(reply) == stored
    assert fallbacks() >= before + 2

    # Asked again (a gateway retry, or another replica): PostgreSQL's verdict.
    reply, outcome = await service.answer(plain)
    assert (reply, outcome) == (plain_reply, "cached_db")


async def test_two_workers_without_redis_give_one_verdict(
    make_service: ServiceFactory, dead_redis_url: str, pg_pool: asyncpg.Pool
) -> None:
    """Both judge the event at once and reach different verdicts; the first commit
    stands and both reply it."""
    first, second = make_service(dead_redis_url, flip=True), make_service(dead_redis_url, flip=True)
    Flip.runs = 0
    req = request()

    (a, a_outcome), (b, b_outcome) = await asyncio.gather(first.answer(req), second.answer(req))

    assert Flip.runs == 2  # no claims: both judged, with different results
    assert a == b
    assert sorted([a_outcome, b_outcome]) == ["cached_db", "first_time"]
    stored = await get_verdict(pg_pool, req.event_id)
    assert stored is not None and Verdict.from_json(a) == stored


async def test_one_worker_without_redis_judges_an_event_once(
    make_service: ServiceFactory, dead_redis_url: str
) -> None:
    """Requests for an event this worker is judging already wait for that judgement."""
    service = make_service(dead_redis_url, flip=True)
    Flip.runs = 0
    req = request()

    (a, a_outcome), (b, b_outcome) = await asyncio.gather(service.answer(req), service.answer(req))

    assert Flip.runs == 1
    assert a == b and (a_outcome, b_outcome) == ("first_time", "waited")


async def test_a_redis_that_comes_back_is_used_again(
    make_service: ServiceFactory, private_redis: PrivateRedis
) -> None:
    service = make_service(private_redis.url)  # not started yet: down
    before = fallbacks()
    reply, outcome = await service.answer(request())
    assert outcome == "first_time", reply
    assert fallbacks() == before + 1

    private_redis.start()
    await asyncio.sleep(1.2)  # past the skip after the failure
    req = request()
    reply, outcome = await service.answer(req)

    assert outcome == "first_time", reply
    assert fallbacks() == before + 1  # claimed and cached in Redis again
    check = aioredis.Redis.from_url(private_redis.url)
    try:
        assert await check.get(redis_keys.verdict(req.event_id)) == reply
    finally:
        await check.aclose()

    # And down again mid-run: judged without it once more.
    private_redis.stop()
    reply, outcome = await service.answer(request())
    assert outcome == "first_time", reply
    assert fallbacks() == before + 2


async def test_a_redis_that_stops_answering_mid_batch_is_skipped_by_the_next_batches(
    make_service: ServiceFactory, private_redis: PrivateRedis
) -> None:
    """Redis hangs (paused) while an event is judged: caching that verdict times out,
    and the next batches go without Redis at once instead of each waiting that long."""
    private_redis.start()
    service = make_service(private_redis.url, flip=True)  # socket timeouts: 0.5 s
    Flip.runs = 0
    judged = asyncio.create_task(service.answer(request()))
    while Flip.runs == 0:
        await asyncio.sleep(0.01)
    private_redis.pause()
    reply, outcome = await judged  # its cache-and-release waited for the socket timeout
    assert outcome == "first_time", reply

    Flip.seconds = 0.05
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        reply, outcome = await service.answer(request())
        took = loop.time() - began
    finally:
        Flip.seconds = 0.3
    assert outcome == "first_time", reply
    assert took < 0.4  # no Redis attempt (it would take the 0.5 s socket timeout)


async def test_a_paused_holder_replies_the_verdict_of_the_worker_that_took_over(
    make_service: ServiceFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """L2 with a paused worker (SIGSTOP past the claim's life): its claim lapses, another
    worker takes it over and commits; the holder, resumed, finds that verdict stored and
    replies it although its own evaluation said otherwise."""
    redis_url = redis_client.connection_pool.connection_kwargs
    url = f"redis://{redis_url['host']}:{redis_url['port']}/{redis_url['db']}"
    holder = make_service(url, flip=True, claim_ttl_seconds=0.3)
    taker = make_service(url, flip=True, claim_ttl_seconds=0.3)

    async def paused(claims: dict[str, str]) -> None:  # a stopped process renews nothing
        await asyncio.Event().wait()

    monkeypatch.setattr(holder, "_keep_claims", paused)
    Flip.runs = 0
    Flip.seconds = 1.0  # the holder's evaluation outlives its claim
    try:
        req = request()
        held = asyncio.create_task(holder.answer(req))
        while not await redis_client.exists(redis_keys.evaluation_claim(req.event_id)):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        Flip.seconds = 0.05  # the taker judges quickly, before the holder finishes
        taken, taken_outcome = await taker.answer(req)
        held_reply, held_outcome = await held
    finally:
        Flip.seconds = 0.3

    assert Flip.runs == 2
    assert taken_outcome == "first_time"
    assert Verdict.from_json(taken).content_class is ContentClass.NEUTRAL  # 2nd run
    assert (held_reply, held_outcome) == (taken, "cached_db")
    stored = await get_verdict(pg_pool, req.event_id)
    assert stored is not None and Verdict.from_json(taken) == stored

"""Filters judging many events at once ask Redis in one round trip, with the results
they would get one event at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.filters.filter_helpers import OWN_USER, config, context, message, new_event_id
from tests.storage.test_redis_autopipeline import RoundTrips, counting_client
from warden import redis_keys
from warden.filters.base import FilterDeps
from warden.filters.frequency import _COUNT, WINDOW_MS, FrequencyFilter
from warden.filters.hellban_prefilter import HellbanPrefilter
from warden.policy.harms import SPAM_FLOODING
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass

P = ContentClass.PROHIBITED
N = ContentClass.NEUTRAL


@pytest.fixture
async def counted_deps(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> AsyncIterator[tuple[FilterDeps, RoundTrips]]:
    """Filter dependencies whose Redis client counts its requests (after connecting)."""
    client, trips = counting_client()
    await client.ping()
    # The frequency script is cached by Redis, as it is after a worker's first use.
    await client.script_load(_COUNT.source)
    trips.writes = 0
    try:
        yield FilterDeps(redis=client, pool=pg_pool, local_user_id=OWN_USER), trips
    finally:
        await client.aclose()


def sender(i: int) -> str:
    return f"@user{i}:example.org"


def sent_by(user: str) -> dict[str, object]:
    ev = message("hello")
    ev["sender"] = user
    return ev


async def test_hellban_lookups_of_events_judged_together_share_one_round_trip(
    counted_deps: tuple[FilterDeps, RoundTrips], redis_client: aioredis.Redis
) -> None:
    deps, trips = counted_deps
    banned = {sender(i) for i in range(0, 40, 4)}
    for user in banned:
        await redis_client.set(redis_keys.hellban("c1", user), b"1", ex=60)
    await redis_client.set(redis_keys.hellban("c2", sender(1)), b"1", ex=60)  # elsewhere
    ctxs = [context(sent_by(sender(i)), deps, community_id="c1") for i in range(40)]

    results = await asyncio.gather(*(HellbanPrefilter().check(ctx) for ctx in ctxs))

    for ctx, result in zip(ctxs, results, strict=True):
        if ctx.sender in banned:
            assert result.content_class is P and result.harms == (SPAM_FLOODING,)
        else:
            assert result.content_class is N
    assert trips.writes == 1


async def test_frequency_counts_of_events_judged_together_share_one_round_trip(
    counted_deps: tuple[FilterDeps, RoundTrips], redis_client: aioredis.Redis
) -> None:
    deps, trips = counted_deps
    cfg = config(frequency_filter_rate_limit=1.0)  # over 60 in the window is flooding
    key = redis_keys.frequency("frequency", "default", sender(0))
    now = 50_000_000
    # One event just out of the window (pruned), one just inside (counted).
    await redis_client.zadd(key, {"$old": now - WINDOW_MS, "$recent": now - WINDOW_MS + 1})
    ctxs = [
        context(sent_by(sender(0)), deps, cfg, now_ms=now, event_id=new_event_id())
        for _ in range(90)
    ]
    # The same event twice in the batch counts once (ZADD NX keeps its first score).
    ctxs.append(context(sent_by(sender(0)), deps, cfg, now_ms=now, event_id=ctxs[0].event_id))

    results = await asyncio.gather(*(FrequencyFilter().check(ctx) for ctx in ctxs))

    assert trips.writes == 1
    # Counts 2..91 (the recent one first): 31 of the 90 are above 60.
    assert sum(r.content_class is P for r in results[:90]) == 31
    assert all(r.harms == (SPAM_FLOODING,) for r in results if r.content_class is P)
    assert results[90].content_class is P  # the repeat sees the full window
    assert await redis_client.zcard(key) == 91
    assert await redis_client.zscore(key, "$old") is None
    assert await redis_client.zscore(key, ctxs[0].event_id) == now
    assert 0 < await redis_client.pttl(key) <= 2 * WINDOW_MS


async def test_a_batch_of_evaluations_asks_redis_once_per_filter_group(
    counted_deps: tuple[FilterDeps, RoundTrips], redis_client: aioredis.Redis
) -> None:
    deps, trips = counted_deps
    pipeline = Pipeline(deps, timeout_seconds=5)
    cfg = config(frequency_filter_rate_limit=0.5)

    verdicts = await asyncio.gather(
        *(
            pipeline.evaluate(
                sent_by(sender(i)), event_id=new_event_id(), community_id="default", config=cfg
            )
            for i in range(30)
        )
    )

    # The hellban lookups in one round trip, then the frequency counts in another.
    assert trips.writes == 2
    for verdict in verdicts:
        assert verdict.content_class is N
        assert {"hellban_prefilter", "frequency"} <= {f.name for f in verdict.filters}
    for i in range(30):
        assert (
            await redis_client.zcard(redis_keys.frequency("frequency", "default", sender(i))) == 1
        )

"""Hellban and frequency state lives in Redis: shared by every worker, keyed safely."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from tests.filters.filter_helpers import ALICE, OWN_USER, config, message, new_event_id
from warden import redis_keys
from warden.filters.base import FilterDeps
from warden.policy.config import EffectiveConfig
from warden.policy.harms import SPAM, SPAM_FLOODING
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict

P = ContentClass.PROHIBITED
N = ContentClass.NEUTRAL


async def judge(
    p: Pipeline,
    body: str,
    cfg: EffectiveConfig,
    *,
    community: str = "default",
    event_id: str | None = None,
) -> Verdict:
    return await p.evaluate(
        message(body),
        event_id=event_id or new_event_id(),
        community_id=community,
        config=cfg,
    )


async def test_hellban_is_shared_scoped_and_never_extended(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    # Two "workers": separate pipelines with their own Redis connections.
    other_redis = aioredis.from_url(REDIS_URL)
    try:
        worker_a = Pipeline(
            FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER),
            timeout_seconds=2,
        )
        worker_b = Pipeline(
            FilterDeps(redis=other_redis, pool=pg_pool, local_user_id=OWN_USER),
            timeout_seconds=2,
        )
        cfg = config(hellban_postfilter_minutes=10)
        key = redis_keys.hellban("c1", ALICE)

        first = await judge(worker_a, "buy spam", cfg, community="c1")
        assert first.content_class is P and first.harms == (SPAM,)
        ttl = await redis_client.ttl(key)
        assert 0 < ttl <= 600

        # The other worker refuses the sender's innocent message: the hellban prefilter.
        innocent = await judge(worker_b, "hello friends", cfg, community="c1")
        assert innocent.content_class is P and innocent.harms == (SPAM_FLOODING,)
        assert [f.name for f in innocent.filters if f.content_class is P] == ["hellban_prefilter"]
        assert "keyword" not in {f.name for f in innocent.filters}  # content filters skipped

        # Another community is not affected.
        elsewhere = await judge(worker_b, "hello friends", cfg, community="c2")
        assert elsewhere.content_class is N

        # Repeat offences while banned do not extend the ban.
        await redis_client.expire(key, 100)
        await judge(worker_b, "more spam", cfg, community="c1")
        await judge(worker_a, "hello again", cfg, community="c1")
        assert 0 < await redis_client.ttl(key) <= 100

        # Disabled: no prefilter, no postfilter.
        off = config(hellban_postfilter_minutes=0)
        assert (await judge(worker_a, "hello", off, community="c1")).content_class is N
        await judge(worker_a, "spam", off, community="c3")
        assert not await redis_client.exists(redis_keys.hellban("c3", ALICE))
    finally:
        await other_redis.aclose()


async def test_frequency_counts_event_ids_once_across_workers(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    other_redis = aioredis.from_url(REDIS_URL)
    try:
        worker_a = Pipeline(
            FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER),
            timeout_seconds=2,
        )
        worker_b = Pipeline(
            FilterDeps(redis=other_redis, pool=pg_pool, local_user_id=OWN_USER),
            timeout_seconds=2,
        )
        # 3/60 events per second is exactly the limit (> is needed), 4/60 is over.
        cfg = config(frequency_filter_rate_limit=0.05, hellban_postfilter_minutes=0)
        key = redis_keys.frequency("frequency", "default", ALICE)

        same = new_event_id()
        for _ in range(3):  # the same event, evaluated repeatedly on both workers
            assert (await judge(worker_a, "hi", cfg, event_id=same)).content_class is N
            assert (await judge(worker_b, "hi", cfg, event_id=same)).content_class is N
        assert await redis_client.zcard(key) == 1

        assert (await judge(worker_b, "hi", cfg)).content_class is N  # 2
        assert (await judge(worker_a, "hi", cfg)).content_class is N  # 3: 3/60 == limit
        over = await judge(worker_b, "hi", cfg)  # 4: 4/60 > limit
        assert over.content_class is P and over.harms == (SPAM_FLOODING,)
        assert await redis_client.zcard(key) == 4
        assert 0 < await redis_client.pttl(key) <= 120_000

        # Types not listed are not counted; off by default.
        notice_cfg = config(
            frequency_filter_rate_limit=0.05,
            frequency_filter_event_types=["m.reaction"],
            hellban_postfilter_minutes=0,
        )
        assert (await judge(worker_a, "hi", notice_cfg)).content_class is N
        assert "frequency" not in {f.name for f in (await judge(worker_a, "hi", config())).filters}
    finally:
        await other_redis.aclose()


async def test_frequency_window_slides(redis_client: aioredis.Redis, pg_pool: asyncpg.Pool) -> None:
    """Entries older than 60 s are pruned (time is the evaluation's clock)."""
    p = Pipeline(
        FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER), timeout_seconds=2
    )
    cfg = config(frequency_filter_rate_limit=1 / 60, hellban_postfilter_minutes=0)
    key = redis_keys.frequency("frequency", "default", ALICE)
    t0 = 10_000_000
    first = await p.evaluate(
        message("a"),
        event_id=new_event_id(),
        community_id="default",
        config=cfg,
        first_seen_ts=t0,
    )
    assert first.content_class is N  # 1/60 is not above 1/60
    second = await p.evaluate(
        message("b"),
        event_id=new_event_id(),
        community_id="default",
        config=cfg,
        first_seen_ts=t0 + 30_000,
    )
    assert second.content_class is P
    later = await p.evaluate(
        message("c"),
        event_id=new_event_id(),
        community_id="default",
        config=cfg,
        first_seen_ts=t0 + 95_000,
    )
    assert later.content_class is N  # the first two fell out of the window
    assert await redis_client.zcard(key) == 1

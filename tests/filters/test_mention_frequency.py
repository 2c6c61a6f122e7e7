"""Mention frequency: a 60 s window of mentions per sender, in Redis, shared by workers.

Boundary as policyserv: refused when (mentions in the window, this event's
included) / 60 > ``mention_frequency_filter_rate_limit``.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from tests.filters.filter_helpers import ALICE, OWN_USER, config, context, event
from warden import redis_keys
from warden.filters.base import FilterDeps
from warden.filters.mention_frequency import MentionFrequencyFilter, per_event_cap
from warden.policy.config import EffectiveConfig
from warden.policy.harms import SPAM_FLOODING
from warden.policy.verdict import ContentClass
from warden.storage.displaynames import replace_displaynames

N = ContentClass.NEUTRAL
P = ContentClass.PROHIBITED
MEMBERS = {f"@member{i}:example.org": f"Member number {i}" for i in range(10)}
T0 = 1_800_000_000_000


async def _room(pool: asyncpg.Pool) -> str:
    room = f"!{uuid.uuid4().hex}:example.org"
    await replace_displaynames(pool, room, MEMBERS)
    return room


def _mentioning(room: str, n: int, sender: str = ALICE) -> dict[str, Any]:
    ids = list(MEMBERS)[:n]
    ev = event(
        "m.room.message", {"msgtype": "m.text", "body": "hi", "m.mentions": {"user_ids": ids}}
    )
    ev["room_id"] = room
    ev["sender"] = sender
    return ev


async def _check(
    deps: FilterDeps,
    ev: dict[str, Any],
    cfg: EffectiveConfig,
    *,
    event_id: str,
    now_ms: int,
    community: str,
    sender_verified: bool = True,
) -> ContentClass:
    ctx = context(ev, deps, cfg, community_id=community, event_id=event_id, now_ms=now_ms)
    ctx.sender_verified = sender_verified
    result = await MentionFrequencyFilter().check(ctx)
    assert set(result.harms) <= {SPAM_FLOODING}
    return result.content_class


async def test_window_is_shared_counted_once_and_survives_config_changes(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    other_redis = aioredis.from_url(REDIS_URL)
    try:
        worker_a = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
        worker_b = FilterDeps(redis=other_redis, pool=pg_pool, local_user_id=OWN_USER)
        community = f"c{uuid.uuid4().hex}"
        room = await _room(pg_pool)
        cfg = config(mention_frequency_filter_rate_limit=0.05)  # 3 mentions a minute
        assert MentionFrequencyFilter.enabled(cfg)

        first = _mentioning(room, 3)
        # 3/60 is not above 0.05: the rate itself is allowed (>).
        assert (
            await _check(worker_a, first, cfg, event_id="$one", now_ms=T0, community=community) is N
        )
        # The same event judged again, by another worker: still counted once.
        assert (
            await _check(worker_b, first, cfg, event_id="$one", now_ms=T0 + 10, community=community)
            is N
        )
        counts = redis_keys.frequency_counts("mention_frequency", community, ALICE)
        assert int(await redis_client.hget(counts, "#total")) == 3
        assert 0 < await redis_client.pttl(counts) <= 120_000
        window = redis_keys.frequency("mention_frequency", community, ALICE)
        assert 0 < await redis_client.pttl(window) <= 120_000

        # A configuration change (a new object, another key changed) keeps the window.
        changed = config(
            mention_frequency_filter_rate_limit=0.05,
            mention_frequency_filter_min_plaintext_length=9,
        )
        second = _mentioning(room, 1)
        assert (
            await _check(
                worker_b, second, changed, event_id="$two", now_ms=T0 + 20, community=community
            )
            is P
        )
        # While over the rate, even an event without mentions is refused (as policyserv).
        quiet = _mentioning(room, 0)
        assert (
            await _check(
                worker_a, quiet, cfg, event_id="$three", now_ms=T0 + 30, community=community
            )
            is P
        )
        # Other senders and other communities have their own windows.
        bob = _mentioning(room, 1, sender="@bob:example.org")
        assert (
            await _check(worker_a, bob, cfg, event_id="$four", now_ms=T0 + 30, community=community)
            is N
        )
        assert (
            await _check(
                worker_a,
                second,
                cfg,
                event_id="$five",
                now_ms=T0 + 30,
                community="elsewhere" + community,
            )
            is N
        )
        # 60 s later the first event has left the window: 1 mention remains.
        assert (
            await _check(
                worker_a, quiet, cfg, event_id="$six", now_ms=T0 + 60_001, community=community
            )
            is N
        )
        assert int(await redis_client.hget(counts, "#total")) == 1
        assert await redis_client.hget(counts, "$one") is None
    finally:
        await other_redis.aclose()


async def test_one_event_count_is_capped_and_unverified_senders_are_not_counted(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
    community = f"c{uuid.uuid4().hex}"
    room = await _room(pg_pool)
    cfg = config(mention_frequency_filter_rate_limit=0.05)
    assert per_event_cap(0.05) == 4  # ceil(0.05 * 60 + 1)
    counts = redis_keys.frequency_counts("mention_frequency", community, ALICE)

    # Not attributable to its sender: no count, no refusal.
    many = _mentioning(room, 10)
    assert (
        await _check(
            deps, many, cfg, event_id="$x", now_ms=T0, community=community, sender_verified=False
        )
        is N
    )
    assert not await redis_client.exists(counts)

    # Ten mentions count as the cap, four: over the rate on their own.
    assert await _check(deps, many, cfg, event_id="$y", now_ms=T0, community=community) is P
    assert int(await redis_client.hget(counts, "#total")) == 4
    assert int(await redis_client.hget(counts, "$y")) == 4

    # Display names in the body count too, like the mentions filter (≥ min length).
    named = event("m.room.message", {"msgtype": "m.text", "body": "hello Member number 1"})
    named["room_id"] = room
    other = f"c{uuid.uuid4().hex}"
    lenient = config(mention_frequency_filter_rate_limit=0.01)  # 0.6 a minute
    assert await _check(deps, named, lenient, event_id="$z", now_ms=T0, community=other) is P
    strict_names = config(
        mention_frequency_filter_rate_limit=0.01, mention_frequency_filter_min_plaintext_length=100
    )
    third = f"c{uuid.uuid4().hex}"
    assert await _check(deps, named, strict_names, event_id="$w", now_ms=T0, community=third) is N

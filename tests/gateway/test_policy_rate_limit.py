"""The per-origin rate limit: counted locally, shared by gateway replicas through Redis
at each sync, counted only after authentication."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from tests.gateway.policy_harness import (
    SIGN_PATH,
    Gateway,
    GatewayFactory,
    Origin,
    StandInWorker,
    new_room_id,
)
from tests.private_redis import PrivateRedis
from warden import redis_keys
from warden.matrix.errors import LimitExceeded
from warden_gateway.rate_limit import OriginRateLimiter

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]

# A fixed clock: 25 s into a 60 s window, so the window never rolls over mid-test.
NOW = 1_800_000_025.0


async def post_sign(gateway: Gateway, origin: Origin, event: Any) -> Any:
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


async def test_limit_is_shared_by_replicas_and_per_origin(
    make_gateway: GatewayFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    settings = {
        "sign_rate_limit_per_origin": 4,
        "sign_rate_limit_window_seconds": 60,
        "rate_clock": lambda: NOW,
    }
    one = await make_gateway(**settings)
    two = await make_gateway(**settings)
    await start_worker()
    busy, quiet = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("12"), "12")

    statuses = []
    for i in range(4):
        replica = one if i % 2 == 0 else two
        r = await post_sign(replica, busy, busy.event(room_id, "12", body=f"m{i}"))
        statuses.append(r.status_code)
    assert statuses == [200, 200, 200, 200]
    # Each replica has counted two; once both have synced, each knows of all four.
    await one.rate_limiter.sync()
    await two.rate_limiter.sync()
    await one.rate_limiter.sync()  # learns what two added

    for replica in (one, two):
        r = await post_sign(replica, busy, busy.event(room_id, "12", body="one too many"))
        assert r.status_code == 429
        body = r.json()
        assert body["errcode"] == "M_LIMIT_EXCEEDED"
        # 35 s left in the window.
        assert body["retry_after_ms"] == 35_000
        assert r.headers["Retry-After"] == "35"

    # Another origin has its own budget.
    r = await post_sign(two, quiet, quiet.event(room_id, "12"))
    assert r.status_code == 200


async def test_unauthenticated_requests_do_not_spend_an_origins_budget(
    make_gateway: GatewayFactory,
    origin: Origin,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_gateway(
        sign_rate_limit_per_origin=2, sign_rate_limit_window_seconds=60, rate_clock=lambda: NOW
    )
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    impostor = await start_origin()
    event = origin.event(room_id, "12")
    # Claims to be ``origin`` but cannot sign as it.
    forged = impostor.auth(SIGN_PATH, event).replace(impostor.name, origin.name)
    for _ in range(5):
        r = await gateway.client.post(
            SIGN_PATH, content=orjson.dumps(event), headers={"Authorization": forged}
        )
        assert r.status_code == 401

    window = int(NOW // 60)
    await gateway.rate_limiter.sync()
    assert await redis_client.get(redis_keys.rate_limit(origin.name, window)) is None
    for i in range(2):
        r = await post_sign(gateway, origin, origin.event(room_id, "12", body=f"m{i}"))
        assert r.status_code == 200
    await gateway.rate_limiter.sync()
    assert int(await redis_client.get(redis_keys.rate_limit(origin.name, window))) == 2
    # Unknown rooms count too: the limit protects the gateway, not the rooms.
    r = await post_sign(gateway, origin, origin.event(new_room_id("12"), "12"))
    assert r.status_code == 429


async def test_limiter_uses_one_expiring_key_per_window(redis_client: aioredis.Redis) -> None:
    now = [1_000_000_005.5]
    limiter = OriginRateLimiter(redis_client, 2, 10, clock=lambda: now[0])
    limiter.check("a.example")
    limiter.check("a.example")
    # Refused before any sync: this replica's own count is enough.
    with pytest.raises(LimitExceeded) as caught:
        limiter.check("a.example")
    assert caught.value.extra["retry_after_ms"] == 4_500
    await limiter.sync()
    key = redis_keys.rate_limit("a.example", 100_000_000)
    assert int(await redis_client.get(key)) == 3  # refused requests count too
    ttl = await redis_client.pttl(key)
    assert 0 < ttl <= 20_000
    now[0] += 10  # the next window starts afresh
    limiter.check("a.example")
    await limiter.aclose()


async def test_replicas_learn_each_others_counts_at_sync(redis_client: aioredis.Redis) -> None:
    now = 2_000_000_003.0
    one = OriginRateLimiter(redis_client, 5, 10, clock=lambda: now)
    two = OriginRateLimiter(redis_client, 5, 10, clock=lambda: now)
    for _ in range(4):
        one.check("busy.example")
    two.check("busy.example")  # two knows nothing of one's four yet
    await one.sync()  # Redis holds 4
    await two.sync()  # Redis holds 5; two learns it
    await one.sync()  # one learns it too (adding nothing)
    for limiter in (one, two):
        with pytest.raises(LimitExceeded):
            limiter.check("busy.example")
    one.check("quiet.example")  # per origin
    # Counts are kept for the whole window, not only until the next sync: a slow
    # origin at its limit stays refused.
    await one.sync()
    await one.sync()
    with pytest.raises(LimitExceeded):
        one.check("busy.example")
    await one.aclose()
    await two.aclose()


async def test_counts_are_synced_in_the_background(redis_client: aioredis.Redis) -> None:
    now = 2_100_000_003.0
    limiter = OriginRateLimiter(redis_client, 100, 10, clock=lambda: now, sync_interval=0.01)
    key = redis_keys.rate_limit("bg.example", int(now // 10))
    limiter.check("bg.example")
    limiter.check("bg.example")
    for _ in range(500):  # bounded wait for the sync task; nothing timed is asserted
        if await redis_client.get(key) is not None:
            break
        await asyncio.sleep(0.01)
    assert int(await redis_client.get(key)) == 2
    await limiter.aclose()


async def test_redis_down_keeps_limiting_locally_and_counts_the_error() -> None:
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    now = 2_200_000_003.0
    limiter = OriginRateLimiter(unreachable, 3, 10, clock=lambda: now, sync_interval=3600)
    errors = REGISTRY.get_sample_value("warden_sign_rate_limit_errors_total") or 0.0
    for _ in range(3):
        limiter.check("a.example")
    await limiter.sync()
    assert REGISTRY.get_sample_value("warden_sign_rate_limit_errors_total") == errors + 1
    # The unshared counts are kept: the limit still holds, sync after sync (M6: it
    # never fails open).
    with pytest.raises(LimitExceeded):
        limiter.check("a.example")
    await limiter.sync()
    await limiter.sync()
    with pytest.raises(LimitExceeded):
        limiter.check("a.example")
    limiter.check("b.example")  # still per origin
    await limiter.aclose()
    await unreachable.aclose()


async def test_counts_kept_while_redis_was_down_are_shared_once_it_answers(
    redis_client: aioredis.Redis,
) -> None:
    now = 2_300_000_003.0
    limiter = OriginRateLimiter(redis_client, 100, 10, clock=lambda: now, sync_interval=3600)
    key = redis_keys.rate_limit("late.example", int(now // 10))
    for _ in range(3):
        limiter.check("late.example")
    pool = redis_client.connection_pool
    redis_client.connection_pool = aioredis.ConnectionPool(host="127.0.0.1", port=1)
    try:
        await limiter.sync()  # fails: counts kept
    finally:
        await redis_client.connection_pool.disconnect()
        redis_client.connection_pool = pool
    assert await redis_client.get(key) is None
    limiter.check("late.example")
    await limiter.sync()
    assert int(await redis_client.get(key)) == 4
    await limiter.aclose()


async def test_background_syncs_skip_a_failed_redis_then_use_it_again_when_back() -> None:
    """M6: after a failed sync the background syncs do not try Redis again for a moment
    (each would pay a failed attempt); the counts keep limiting locally, and once the
    (restarted) Redis answers they are shared, with no restart of the gateway."""
    server = PrivateRedis()  # not started: nothing listens yet
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    registry = CollectorRegistry()
    errors = Counter("test_sync_errors", "failed syncs", registry=registry)
    now = 2_400_000_003.0
    limiter = OriginRateLimiter(client, 1000, 10, clock=lambda: now, errors=errors)
    before = _fallbacks()
    try:
        checks = 0
        for _ in range(30):
            limiter.check("back.example")
            checks += 1
            await asyncio.sleep(0.01)  # past the 50 ms sync interval several times
        assert registry.get_sample_value("test_sync_errors_total") == 1
        assert _fallbacks() >= before + 3  # the failed sync and the skipped ones

        server.start()
        await asyncio.sleep(1.1)  # the skip is over
        limiter.check("back.example")
        checks += 1
        key = redis_keys.rate_limit("back.example", int(now // 10))
        for _ in range(100):
            if await client.get(key) is not None:
                break
            await asyncio.sleep(0.02)
        assert int(await client.get(key)) == checks
    finally:
        await limiter.aclose()
        await client.aclose()
        server.stop()


def _fallbacks() -> float:
    return REGISTRY.get_sample_value("warden_redis_fallbacks_total", {"use": "rate_limit"}) or 0.0


async def test_zero_disables_the_limit(redis_client: aioredis.Redis) -> None:
    limiter = OriginRateLimiter(redis_client, 0, 10)
    for _ in range(20):
        limiter.check("a.example")
    await limiter.aclose()
    assert await redis_client.keys("warden:rl:*") == []


async def test_cached_answers_about_other_servers_events_are_not_charged(
    make_gateway: GatewayFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    # M5: in a spam wave every server asks about each spam event; those answers come
    # from cache and must not spend the budget the asking server's own users need.
    gateway = await make_gateway(
        sign_rate_limit_per_origin=100, sign_rate_limit_window_seconds=60, rate_clock=lambda: NOW
    )
    worker = await start_worker()
    spammer, bystander = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("12"), "12")
    spam = [spammer.event(room_id, "12", body=f"spam {i}") for i in range(100)]
    for event in spam:
        assert (await post_sign(gateway, spammer, event)).status_code == 200
    assert worker.count == 100
    for i, event in enumerate(spam):
        if i % 2:
            # As relayed to the bystander: another ``unsigned``, so other bytes (a body
            # the gateway has not checked before), the same event.
            event = {**event, "unsigned": {"age_ts": event["origin_server_ts"] + 7}}
        r = await post_sign(gateway, bystander, event)
        assert r.status_code == 200, (i, r.text)
    assert worker.count == 100  # all answered from cache
    own = bystander.event(room_id, "12", body="my own user's message")
    r = await post_sign(gateway, bystander, own)
    assert r.status_code == 200, r.text
    # The spammer's own budget is spent.
    r = await post_sign(gateway, spammer, spammer.event(room_id, "12", body="one more"))
    assert r.status_code == 429


async def test_other_servers_events_that_need_a_verdict_have_their_own_budget(
    make_gateway: GatewayFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_gateway(
        sign_rate_limit_per_origin=3, sign_rate_limit_window_seconds=60, rate_clock=lambda: NOW
    )
    await start_worker()
    sender, asker = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("12"), "12")
    for i in range(3):  # never asked before: each needs a verdict, and is charged
        r = await post_sign(gateway, asker, sender.event(room_id, "12", body=f"new {i}"))
        assert r.status_code == 200
    r = await post_sign(gateway, asker, sender.event(room_id, "12", body="new 4"))
    assert r.status_code == 429
    assert r.json()["errcode"] == "M_LIMIT_EXCEEDED"
    # Its own users' events have their own budget, untouched.
    r = await post_sign(gateway, asker, asker.event(room_id, "12", body="mine"))
    assert r.status_code == 200
    await gateway.rate_limiter.sync()
    window = int(NOW // 60)
    assert int(await redis_client.get(redis_keys.rate_limit(asker.name, window))) == 1
    others = redis_keys.rate_limit(asker.name, window, "sign_others")
    assert int(await redis_client.get(others)) == 4

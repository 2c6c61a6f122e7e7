"""The per-origin rate limit: shared by gateway replicas through Redis, counted only
after authentication."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from tests.gateway.policy_harness import (
    SIGN_PATH,
    Gateway,
    GatewayFactory,
    Origin,
    StandInWorker,
    new_room_id,
)
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
    assert await redis_client.get(redis_keys.rate_limit(origin.name, window)) is None
    for i in range(2):
        r = await post_sign(gateway, origin, origin.event(room_id, "12", body=f"m{i}"))
        assert r.status_code == 200
    assert int(await redis_client.get(redis_keys.rate_limit(origin.name, window))) == 2
    # Unknown rooms count too: the limit protects the gateway, not the rooms.
    r = await post_sign(gateway, origin, origin.event(new_room_id("12"), "12"))
    assert r.status_code == 429


async def test_limiter_uses_one_expiring_key_per_window(redis_client: aioredis.Redis) -> None:
    now = [1_000_000_005.5]
    limiter = OriginRateLimiter(redis_client, 2, 10, clock=lambda: now[0])
    await limiter.check("a.example")
    await limiter.check("a.example")
    key = redis_keys.rate_limit("a.example", 100_000_000)
    assert int(await redis_client.get(key)) == 2
    ttl = await redis_client.pttl(key)
    assert 0 < ttl <= 20_000
    with pytest.raises(LimitExceeded) as caught:
        await limiter.check("a.example")
    assert caught.value.extra["retry_after_ms"] == 4_500
    now[0] += 10  # the next window starts afresh
    await limiter.check("a.example")


async def test_zero_disables_the_limit(redis_client: aioredis.Redis) -> None:
    limiter = OriginRateLimiter(redis_client, 0, 10)
    for _ in range(20):
        await limiter.check("a.example")
    assert await redis_client.keys("warden:rl:*") == []

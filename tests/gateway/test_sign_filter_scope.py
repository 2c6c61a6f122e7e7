"""Dry run and per-filter conditions end to end: origin homeservers (real HTTPS key
servers) ask the gateway app to ``/sign``, the real filter-worker evaluation service
judges with each test's own community configuration, on real NATS, Redis and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis

from tests.gateway.policy_harness import GATEWAY_NAME, SIGN_PATH, Gateway, Origin, new_room_id
from tests.gateway.real_worker import real_worker  # noqa: F401
from warden import redis_keys
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.policy.config import validate_community_config
from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, Verdict
from warden.storage.communities import create_community, update_community
from warden.storage.verdicts import get_verdict
from warden_filter_worker.evaluation import EvaluationService

VERSION = "10"
ProtectRoom = Callable[..., Awaitable[str]]


async def community(pool: asyncpg.Pool, config: dict[str, Any]) -> str:
    """A new community with ``config``, checked as the admin API checks it."""
    created = await create_community(pool, "Filter scope test")
    await update_community(pool, created.community_id, config=validate_community_config(config))
    return created.community_id


async def ask(gateway: Gateway, origin: Origin, event: dict[str, Any]) -> httpx.Response:
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


def signed(r: httpx.Response) -> bool:
    if r.status_code == 200 and GATEWAY_NAME in r.json():
        return True
    assert r.status_code == 400 and r.json()["errcode"] == "M_FORBIDDEN", r.text
    return False


async def stored(pool: asyncpg.Pool, event: dict[str, Any]) -> Verdict:
    verdict = await get_verdict(pool, str(compute_event_id(get_room_version(VERSION), event)))
    assert verdict is not None
    return verdict


async def test_dry_run_keyword_records_a_refusal_but_the_event_is_signed(
    gateway: Gateway,
    real_worker: EvaluationService,  # noqa: F811
    origin: Origin,
    protect_room: ProtectRoom,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    cid = await community(pg_pool, {"dry_run_filters": ["keyword"]})
    room = await protect_room(new_room_id(VERSION), VERSION, cid)
    alice = f"@alice:{origin.name}"

    spam = origin.event(room, VERSION, body="buy spam now", sender=alice)
    assert signed(await ask(gateway, origin, spam))
    verdict = await stored(pg_pool, spam)
    assert verdict.content_class is ContentClass.NEUTRAL and verdict.harms == ()
    keyword = next(f for f in verdict.filters if f.name == "keyword")
    assert keyword.dry_run and keyword.content_class is ContentClass.PROHIBITED
    assert keyword.harms == (SPAM,)
    assert not await redis_client.exists(redis_keys.hellban(cid, alice))
    follow_up = origin.event(room, VERSION, body="and hello", sender=alice)
    assert signed(await ask(gateway, origin, follow_up))

    # The same message in a community without dry run is refused and the sender banned.
    live = await community(pg_pool, {})
    live_room = await protect_room(new_room_id(VERSION), VERSION, live)
    assert not signed(await ask(gateway, origin, origin.event(live_room, VERSION, body="spam")))
    assert await redis_client.exists(redis_keys.hellban(live, alice))


async def test_condition_limits_a_filter_to_one_room(
    gateway: Gateway,
    real_worker: EvaluationService,  # noqa: F811
    origin: Origin,
    protect_room: ProtectRoom,
    pg_pool: asyncpg.Pool,
) -> None:
    guarded = new_room_id(VERSION)
    cid = await community(pg_pool, {"filter_conditions": {"keyword": {"room_ids": [guarded]}}})
    await protect_room(guarded, VERSION, cid)
    open_room = await protect_room(new_room_id(VERSION), VERSION, cid)

    assert signed(await ask(gateway, origin, origin.event(open_room, VERSION, body="spam")))
    bob = f"@bob:{origin.name}"  # alice's open-room message did not ban anyone
    assert not signed(
        await ask(gateway, origin, origin.event(guarded, VERSION, body="spam", sender=bob))
    )


async def test_condition_limits_a_filter_to_one_event_type(
    gateway: Gateway,
    real_worker: EvaluationService,  # noqa: F811
    origin: Origin,
    protect_room: ProtectRoom,
    pg_pool: asyncpg.Pool,
) -> None:
    cid = await community(
        pg_pool, {"filter_conditions": {"keyword": {"event_types": ["org.example.note"]}}}
    )
    room = await protect_room(new_room_id(VERSION), VERSION, cid)
    message = origin.event(room, VERSION, body="spam")
    assert signed(await ask(gateway, origin, message))
    verdict = await stored(pg_pool, message)
    assert "keyword" not in {f.name for f in verdict.filters}
    note = origin.event(
        room,
        VERSION,
        event_type="org.example.note",
        content={"body": "spam"},
        sender=f"@n:{origin.name}",
    )
    assert not signed(await ask(gateway, origin, note))


async def test_condition_limits_a_filter_to_sender_servers(
    gateway: Gateway,
    real_worker: EvaluationService,  # noqa: F811
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: ProtectRoom,
    pg_pool: asyncpg.Pool,
) -> None:
    good, evil = await start_origin(), await start_origin()
    cid = await community(
        pg_pool, {"filter_conditions": {"keyword": {"sender_servers": [evil.name]}}}
    )
    room = await protect_room(new_room_id(VERSION), VERSION, cid)
    assert signed(await ask(gateway, good, good.event(room, VERSION, body="spam")))
    assert not signed(await ask(gateway, evil, evil.event(room, VERSION, body="spam")))

    # The other way round: every server but the trusted one.
    cid = await community(
        pg_pool, {"filter_conditions": {"keyword": {"not_sender_servers": [good.name]}}}
    )
    room = await protect_room(new_room_id(VERSION), VERSION, cid)
    assert signed(await ask(gateway, good, good.event(room, VERSION, body="spam")))
    assert not signed(await ask(gateway, evil, evil.event(room, VERSION, body="spam")))

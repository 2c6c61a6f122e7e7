"""A body asked for again (a spam wave) skips the event-level checks, never the
request-level ones: X-Matrix, the rate limit, and whether the room is still protected."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from prometheus_client import REGISTRY

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    Gateway,
    GatewayFactory,
    Origin,
    StandInWorker,
    new_room_id,
    synapse_verifies,
)
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version
from warden.storage.rooms import delete_room
from warden_gateway.event_checks import CheckedEvent, CheckedEvents

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]


def checks(result: str) -> float:
    return (
        REGISTRY.get_sample_value("warden_sign_event_check_cache_total", {"result": result}) or 0.0
    )


async def post_body(gateway: Gateway, origin: Origin, event: Any, path: str = SIGN_PATH) -> Any:
    return await gateway.client.post(
        path, content=orjson.dumps(event), headers=origin.headers(path, event)
    )


async def test_the_same_body_from_other_origins_is_checked_once(
    gateway: Gateway,
    origin: Origin,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    others = [await start_origin() for _ in range(3)]
    hits, misses = checks("hit"), checks("miss")

    answers = [await post_body(gateway, o, event) for o in [origin, *others]]

    assert [r.status_code for r in answers] == [200] * 4
    assert len({r.content for r in answers}) == 1
    assert checks("miss") == misses + 1
    assert checks("hit") == hits + 3
    assert worker.count == 1


async def test_a_repeated_body_still_needs_a_valid_x_matrix_signature(
    gateway: Gateway,
    origin: Origin,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    assert (await post_body(gateway, origin, event)).status_code == 200
    impostor = await start_origin()
    forged = impostor.auth(SIGN_PATH, event).replace(impostor.name, origin.name)
    hits = checks("hit")

    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers={"Authorization": forged}
    )
    assert r.status_code == 401
    assert r.json()["errcode"] == "M_UNAUTHORIZED"
    # Signed for another destination: refused as well.
    r = await gateway.client.post(
        SIGN_PATH,
        content=orjson.dumps(event),
        headers={"Authorization": origin.auth(SIGN_PATH, event, destination="other.example")},
    )
    assert r.status_code == 401
    assert checks("hit") == hits + 2


async def test_a_repeated_body_for_a_room_no_longer_protected_is_not_found(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    pg_pool: asyncpg.Pool,
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    assert (await post_body(gateway, origin, event)).status_code == 200

    await delete_room(pg_pool, room_id)
    gateway.rooms.invalidate(room_id)  # what the admin API's NATS notice does
    r = await post_body(gateway, origin, event)
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_NOT_FOUND"


async def test_a_room_protected_again_under_another_version_is_checked_afresh(
    gateway: Gateway,
    make_gateway: GatewayFactory,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("10"), "10")
    event = origin.event(room_id, "10")
    assert (await post_body(gateway, origin, event)).status_code == 200

    await protect_room(room_id, "11")
    gateway.rooms.invalidate(room_id)
    misses = checks("miss")
    again = await post_body(gateway, origin, event)
    fresh = await post_body(await make_gateway(), origin, event)
    assert again.status_code == fresh.status_code
    assert again.json() == fresh.json()
    assert checks("miss") == misses + 1  # only the fresh gateway's first look


async def test_a_repeat_signs_again_when_the_verdict_cache_forgot_the_signature(
    gateway: Gateway,
    start_origin: Callable[[], Awaitable[Origin]],
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    first = await post_body(gateway, origin, event)
    assert first.status_code == 200
    # Evicted from the verdict LRU (it is smaller than a spam wave can be), while the
    # body's checks are still remembered: the verdict comes back without a signature.
    gateway.verdicts._memory.clear()
    hits = checks("hit")

    second = await post_body(gateway, await start_origin(), event)

    assert checks("hit") == hits + 1
    assert second.status_code == 200
    assert second.json() == first.json()
    signature = second.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    assert synapse_verifies("12", event, GATEWAY_NAME, signature, gateway.policy_key)


async def test_check_with_a_repeated_body_still_compares_the_path_event_id(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    event_id = compute_event_id(get_room_version("12"), event)

    def check_path(eid: str) -> str:
        quoted = urllib.parse.quote(eid, safe="")
        return f"/_matrix/policy/unstable/org.matrix.msc4284/event/{quoted}/check"

    ok = await post_body(gateway, origin, event, check_path(event_id))
    assert ok.status_code == 200
    assert ok.json() == {"recommendation": "ok"}
    hits = checks("hit")
    wrong = await post_body(gateway, origin, event, check_path("$not-this-one"))
    assert checks("hit") == hits + 1
    assert wrong.status_code == 400
    assert wrong.json()["errcode"] == "M_INVALID_PARAM"


async def test_the_cache_is_bounded_in_bytes(
    make_gateway: GatewayFactory,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    # M2: 20 000 entries of 64 KiB were 1.25 GiB; the byte bound keeps far less.
    limit = 256 * 1024
    gateway = await make_gateway(event_check_cache_max_bytes=limit)
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    events = [origin.event(room_id, "12", body=f"{i}" + "x" * 40_000) for i in range(20)]
    for event in events:
        assert (await post_body(gateway, origin, event)).status_code == 200
    held = REGISTRY.get_sample_value("warden_sign_event_check_cache_bytes")
    assert held is not None and 0 < held <= limit
    # The oldest bodies were evicted: asking again checks them again; the newest is a hit.
    misses = checks("miss")
    assert (await post_body(gateway, origin, events[0])).status_code == 200
    assert checks("miss") == misses + 1
    hits = checks("hit")
    assert (await post_body(gateway, origin, events[-1])).status_code == 200
    assert checks("hit") == hits + 1


def test_an_entry_larger_than_the_bound_is_not_kept() -> None:
    cache = CheckedEvents(max_bytes=1000)
    entry = CheckedEvent(b"x" * 2000, "!r", "12", "$e", "hash", False, "s.example")
    cache.put(b"digest", entry)
    assert len(cache) == 0 and cache.bytes_held == 0
    small = entry._replace(content_json=b"{}")
    cache.put(b"digest", small)
    cache.put(b"digest", small)  # replacing an entry does not count it twice
    assert len(cache) == 1 and 0 < cache.bytes_held <= 1000

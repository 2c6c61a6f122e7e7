"""One verdict per event from the gateway's side: its cache layers, single-flight, and
503 (never a signature) when no filter worker answers."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from nats.aio.msg import Msg
from prometheus_client import REGISTRY
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    Gateway,
    GatewayFactory,
    Origin,
    StandInWorker,
    new_room_id,
    synapse_verifies,
    verdict_for,
)
from warden import redis_keys
from warden.matrix.event_hashes import compute_event_id, compute_reference_hash
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version
from warden.policy import harms
from warden.policy.verdict import ContentClass, Verdict
from warden_gateway.event_checks import CheckedEvent, CheckedEvents

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]


async def post_sign(gateway: Gateway, origin: Origin, event: Any) -> Any:
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


def layer_count(layer: str) -> float:
    return REGISTRY.get_sample_value("warden_verdict_cache_total", {"layer": layer}) or 0.0


def failure_count(reason: str) -> float:
    return REGISTRY.get_sample_value("warden_verdict_failures_total", {"reason": reason}) or 0.0


async def test_second_request_is_answered_from_memory_without_nats(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    memory_before, nats_before = layer_count("memory"), layer_count("nats")

    first = await post_sign(gateway, origin, event)
    second = await post_sign(gateway, origin, event)

    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert worker.count == 1
    assert layer_count("nats") == nats_before + 1
    assert layer_count("memory") == memory_before + 1
    # The cached entry holds the signature, so the second answer cost no signing.
    event_id = compute_event_id(get_room_version("12"), event)
    entry = gateway.verdicts.cached(event_id)
    assert entry is not None
    assert entry.signature == first.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID]


async def test_refusal_is_cached_too(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    def spam(msg: Msg) -> Any:
        return verdict_for(msg, ContentClass.PROHIBITED, (harms.SPAM,))

    worker = await start_worker(spam)
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    for _ in range(3):
        r = await post_sign(gateway, origin, event)
        assert r.status_code == 400
        assert r.json()["org.matrix.msc4387.harms"] == [harms.SPAM]
    assert worker.count == 1


async def test_concurrent_identical_requests_share_one_nats_request(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker(delay=0.3)
    room_id = await protect_room(new_room_id("11"), "11")
    event = origin.event(room_id, "11")
    in_flight_before = layer_count("in_flight")

    answers = await asyncio.gather(*(post_sign(gateway, origin, event) for _ in range(10)))

    assert [r.status_code for r in answers] == [200] * 10
    assert len({r.content for r in answers}) == 1
    assert worker.count == 1
    assert layer_count("in_flight") == in_flight_before + 9


async def test_another_replica_gets_the_given_verdict_from_a_worker(
    gateway: Gateway,
    make_gateway: GatewayFactory,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    # The stand-in answers a verdict it already gave from Redis, as the real worker does.
    worker = await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    first = await post_sign(gateway, origin, event)
    assert first.status_code == 200

    replica = await make_gateway()
    nats_before = layer_count("nats")
    second = await post_sign(replica, origin, event)
    third = await post_sign(replica, origin, event)

    assert second.status_code == third.status_code == 200
    assert second.json() == third.json() == first.json()
    # One question per replica; the event was decided once.
    assert worker.count == 2
    assert worker.decided == 1
    assert layer_count("nats") == nats_before + 1


async def test_a_cached_refusal_reaches_a_new_replica(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    redis_client: aioredis.Redis,
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    version = get_room_version("12")
    event_id = compute_event_id(version, event)
    stored = Verdict(
        event_id=event_id,
        content_class=ContentClass.PROHIBITED,
        harms=(harms.SPAM_FRAUD,),
        reference_hash=encode_base64(compute_reference_hash(version, event)),
    )
    await redis_client.set(redis_keys.verdict(event_id), stored.to_json())

    r = await post_sign(gateway, origin, event)

    assert r.status_code == 400
    assert r.json()["org.matrix.msc4387.harms"] == [harms.SPAM_FRAUD]
    assert worker.decided == 0


async def test_no_worker_means_503_and_no_signature(
    gateway: Gateway, origin: Origin, protect_room: Protect
) -> None:
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    before = failure_count("no_responders")

    r = await post_sign(gateway, origin, event)

    assert r.status_code == 503
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert "filter worker" in r.json()["error"]
    assert int(r.headers["Retry-After"]) >= 1
    assert GATEWAY_NAME not in r.json()
    assert failure_count("no_responders") == before + 1


async def test_silent_worker_times_out_with_503_then_a_retry_gets_the_verdict(
    make_gateway: GatewayFactory,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    gateway = await make_gateway(verdict_timeout_seconds=0.3)
    # The worker takes longer than the gateway waits, then stores its verdict (as the
    # real worker does: the evaluation does not depend on the HTTP request).
    worker = await start_worker(delay=0.8)
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    before = failure_count("timeout")

    r = await post_sign(gateway, origin, event)
    assert r.status_code == 503
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert "Retry-After" in r.headers
    assert failure_count("timeout") == before + 1

    for _ in range(100):
        await asyncio.sleep(0.05)
        r = await post_sign(gateway, origin, event)
        if r.status_code == 200:
            break
    assert r.status_code == 200, r.text
    signature = r.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    assert synapse_verifies("12", event, GATEWAY_NAME, signature, gateway.policy_key)
    # The 503 cached nothing: the retries asked the workers again. (Not a count of
    # decisions: this stand-in has no claims, so a retry sent before the first decision
    # was stored starts another one, finished or not by now depending on the machine.)
    assert worker.count >= 2 and worker.decided >= 1


async def test_worker_error_and_garbage_replies_are_503(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    replies: list[Any] = [
        {"error": "filters unavailable"},
        b"not json",
        {"class": "weird", "event_id": "x"},
        [1, 2, 3],
    ]

    def answer(msg: Msg) -> Any:
        return replies[(len(worker.requests) - 1) % len(replies)]

    worker = await start_worker(answer)
    room_id = await protect_room(new_room_id("12"), "12")
    for i in range(len(replies)):
        event = origin.event(room_id, "12", body=f"message {i}")
        r = await post_sign(gateway, origin, event)
        assert r.status_code == 503, (i, r.text)
        assert r.json()["errcode"] == "M_UNKNOWN"
        assert "Retry-After" in r.headers


async def test_verdict_for_another_event_is_not_used(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    def confused(msg: Msg) -> Any:
        verdict = verdict_for(msg, ContentClass.NEUTRAL)
        return {**verdict.to_dict(), "event_id": "$somethingelse"}

    await start_worker(confused)
    room_id = await protect_room(new_room_id("12"), "12")
    r = await post_sign(gateway, origin, origin.event(room_id, "12"))
    assert r.status_code == 503


async def test_cached_verdicts_are_invisible_to_the_garbage_collector(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    # Tens of thousands of cached entries as tracked objects made each full collection
    # stall the gateway for over 100 ms; tuples of strings are not tracked.
    def spam_for_some(msg: Msg) -> Any:
        prohibited = b"buy" in msg.data
        return verdict_for(
            msg,
            ContentClass.PROHIBITED if prohibited else ContentClass.NEUTRAL,
            (harms.SPAM,) if prohibited else (),
        )

    await start_worker(spam_for_some)
    room_id = await protect_room(new_room_id("12"), "12")
    signed, refused = origin.event(room_id, "12"), origin.event(room_id, "12", body="buy now")
    assert (await post_sign(gateway, origin, signed)).status_code == 200
    assert (await post_sign(gateway, origin, refused)).status_code == 400

    # A tuple is untracked once a collection finds its items untracked; the harms tuple
    # inside may be examined after the entry, so it takes a second pass for the entry.
    gc.collect()
    gc.collect()
    version = get_room_version("12")
    memory = gateway.verdicts._memory  # what the cache holds, not the view it hands out
    for event in (signed, refused):
        assert not gc.is_tracked(memory[compute_event_id(version, event)])
    signed_entry = gateway.verdicts.cached(compute_event_id(version, signed))
    assert signed_entry is not None and signed_entry.signature is not None


def test_checked_bodies_are_invisible_to_the_garbage_collector() -> None:
    checked = CheckedEvents(size=1000)
    entry = CheckedEvent(
        content_json=b"{}",
        room_id="!r:example.org",
        room_version="12",
        event_id="$e",
        reference_hash="abc",
        policy_state=False,
    )
    gc.collect()
    before = len(gc.get_objects())
    for i in range(1000):
        checked.put(i.to_bytes(4, "big"), entry._replace(event_id=f"$e{i}"))
    gc.collect()
    assert len(gc.get_objects()) - before < 100  # not one object per entry
    assert checked.get((999).to_bytes(4, "big")) == entry._replace(event_id="$e999")

"""The legacy ``POST /_matrix/policy/unstable/org.matrix.msc4284/event/{eventId}/check``."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.msg import Msg

from tests.gateway.policy_harness import Gateway, Origin, StandInWorker, new_room_id, verdict_for
from warden.bus.subjects import HEADER_SOURCE
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.policy import harms
from warden.policy.verdict import ContentClass

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]


def check_path(event_id: str) -> str:
    quoted = urllib.parse.quote(event_id, safe="")
    return f"/_matrix/policy/unstable/org.matrix.msc4284/event/{quoted}/check"


async def post_check(gateway: Gateway, origin: Origin, event: Any, event_id: str) -> Any:
    path = check_path(event_id)
    return await gateway.client.post(
        path, content=orjson.dumps(event), headers=origin.headers(path, event)
    )


def by_body(msg: Msg) -> Any:
    spam = orjson.loads(msg.data)["content"].get("body") == "spam"
    if spam:
        return verdict_for(msg, ContentClass.PROHIBITED, (harms.SPAM,))
    return verdict_for(msg, ContentClass.NEUTRAL)


async def test_check_recommends_ok_or_spam(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker(by_body)
    # Room version 3: event IDs in standard base64, often with "/" and "+".
    room_id = await protect_room(new_room_id("3"), "3")
    version = get_room_version("3")
    for text, expected in (("hello", "ok"), ("spam", "spam")):
        event = origin.event(room_id, "3", body=text)
        r = await post_check(gateway, origin, event, compute_event_id(version, event))
        assert r.status_code == 200, r.text
        assert r.json() == {"recommendation": expected}
    assert [(m.headers or {})[HEADER_SOURCE] for m in worker.requests] == ["check", "check"]


async def test_event_id_with_a_slash_is_matched(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("3"), "3")
    version = get_room_version("3")
    for i in range(200):  # find an event whose v3 ID holds a "/"
        event = origin.event(room_id, "3", body=f"slash hunt {i}")
        event_id = compute_event_id(version, event)
        if "/" in event_id:
            break
    assert "/" in event_id
    r = await post_check(gateway, origin, event, event_id)
    assert r.status_code == 200, r.text
    assert r.json() == {"recommendation": "ok"}


async def test_path_event_id_must_match_the_body(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    r = await post_check(gateway, origin, event, "$not-this-event")
    assert r.status_code == 400
    assert r.json()["errcode"] == "M_INVALID_PARAM"
    assert worker.count == 0


async def test_check_errors_are_the_sign_errors(gateway: Gateway, origin: Origin) -> None:
    event = origin.event(new_room_id("12"), "12")
    r = await post_check(gateway, origin, event, "$x")
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_NOT_FOUND"
    r = await gateway.client.post(check_path("$x"), content=b"{}")
    assert r.status_code == 401
    r = await gateway.client.get(check_path("$x"))
    assert r.status_code == 405
    assert r.json()["errcode"] == "M_UNRECOGNIZED"


async def test_policy_state_event_is_ok_without_a_verdict(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker(by_body)
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12", event_type="m.room.policy", state_key="", content={})
    event_id = compute_event_id(get_room_version("12"), event)
    r = await post_check(gateway, origin, event, event_id)
    assert r.json() == {"recommendation": "ok"}
    assert worker.count == 0

"""A byte-identical repeat of a verified /sign request (a server's retry) is not verified
again; anything that differs, and anything that failed, is."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from prometheus_client import REGISTRY

from tests.gateway.policy_harness import (
    SIGN_PATH,
    Gateway,
    Origin,
    StandInWorker,
    new_room_id,
)
from warden.matrix.ids import ServerName
from warden_gateway.verified_requests import VerifiedRequests, request_key

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]


def cached(result: str) -> float:
    return REGISTRY.get_sample_value("warden_sign_xmatrix_cache_total", {"result": result}) or 0.0


def penalised() -> float:
    value = REGISTRY.get_sample_value(
        "warden_sign_requests_total", {"endpoint": "sign", "outcome": "unauthorized"}
    )
    return value or 0.0


async def test_a_retry_of_a_verified_request_is_not_verified_again(
    gateway: Gateway,
    origin: Origin,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    body, headers = orjson.dumps(event), origin.headers(SIGN_PATH, event)
    hits, misses = cached("hit"), cached("miss")

    first = await gateway.client.post(SIGN_PATH, content=body, headers=headers)
    again = await gateway.client.post(SIGN_PATH, content=body, headers=headers)

    assert first.status_code == again.status_code == 200
    assert first.content == again.content
    assert cached("miss") == misses + 1
    assert cached("hit") == hits + 1
    assert worker.count == 1
    # Another origin asking for the same body is verified (its own header).
    other = await start_origin()
    r = await gateway.client.post(SIGN_PATH, content=body, headers=other.headers(SIGN_PATH, event))
    assert r.status_code == 200
    assert cached("miss") == misses + 2 and cached("hit") == hits + 1


async def test_a_header_that_failed_is_verified_every_time(
    gateway: Gateway,
    origin: Origin,
    start_origin: Callable[[], Awaitable[Origin]],
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    body = orjson.dumps(event)
    assert (
        await gateway.client.post(SIGN_PATH, content=body, headers=origin.headers(SIGN_PATH, event))
    ).status_code == 200
    impostor = await start_origin()
    forged = impostor.auth(SIGN_PATH, event).replace(impostor.name, origin.name)
    hits, failures = cached("hit"), penalised()

    for _ in range(2):
        r = await gateway.client.post(SIGN_PATH, content=body, headers={"Authorization": forged})
        assert r.status_code == 401
        assert r.json()["errcode"] == "M_UNAUTHORIZED"

    assert cached("hit") == hits
    assert penalised() == failures + 2


async def test_the_same_header_with_another_body_or_target_is_verified(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
) -> None:
    """The header alone proves nothing: it was signed over one body and one target."""
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    headers = origin.headers(SIGN_PATH, event)
    assert (
        await gateway.client.post(SIGN_PATH, content=orjson.dumps(event), headers=headers)
    ).status_code == 200
    hits = cached("hit")

    other_event = origin.event(room_id, "12")
    r = await gateway.client.post(SIGN_PATH, content=orjson.dumps(other_event), headers=headers)
    assert r.status_code == 401
    unstable = "/_matrix/policy/unstable/org.matrix.msc4284/sign"
    r = await gateway.client.post(unstable, content=orjson.dumps(event), headers=headers)
    assert r.status_code == 401
    assert cached("hit") == hits


def test_entries_expire_and_are_bounded() -> None:
    now = [100.0]
    memory = VerifiedRequests(size=2, ttl_seconds=30, clock=lambda: now[0])
    a, b, c = (request_key("POST", "/x", [f"X-Matrix origin={n}"], b"d") for n in "abc")
    memory.remember(a, ServerName("a.example"))
    assert memory.origin(a) == "a.example"
    now[0] += 29.9
    assert memory.origin(a) == "a.example"
    now[0] += 0.1
    assert memory.origin(a) is None and len(memory) == 0  # expired, and dropped
    memory.remember(a, ServerName("a.example"))
    memory.remember(b, ServerName("b.example"))
    memory.origin(a)  # not a use that keeps it: only remembering does
    memory.remember(c, ServerName("c.example"))
    assert len(memory) == 2
    assert memory.origin(a) is None
    assert memory.origin(b) == "b.example" and memory.origin(c) == "c.example"
    # The key holds every header in order: two headers are not their concatenation.
    assert request_key("POST", "/x", ["a", "b"], b"d") != request_key("POST", "/x", ["ab"], b"d")
    off = VerifiedRequests(size=0)
    off.remember(a, ServerName("a.example"))
    assert off.origin(a) is None

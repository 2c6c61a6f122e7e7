"""``PS_MAX_PDU_BYTES`` is enforced while reading: honest, lying and absent
Content-Length alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import REGISTRY

from tests.gateway.policy_harness import (
    SIGN_PATH,
    GatewayFactory,
    Origin,
    StandInWorker,
    new_room_id,
)

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]

LIMIT = 4096


def too_large_count() -> float:
    value = REGISTRY.get_sample_value(
        "warden_sign_requests_total", {"endpoint": "sign", "outcome": "too_large"}
    )
    return value or 0.0


def big_event(origin: Origin, room_id: str) -> dict[str, Any]:
    return origin.event(room_id, "12", body="x" * (LIMIT * 2))


async def test_oversized_bodies_are_refused(
    make_gateway: GatewayFactory, origin: Origin, protect_room: Protect
) -> None:
    gateway = await make_gateway(max_pdu_bytes=LIMIT)
    room_id = await protect_room(new_room_id("12"), "12")
    event = big_event(origin, room_id)
    body = orjson.dumps(event)
    headers = origin.headers(SIGN_PATH, event)
    before = too_large_count()

    # Honest Content-Length.
    r = await gateway.client.post(SIGN_PATH, content=body, headers=headers)
    assert r.status_code == 413
    assert r.json()["errcode"] == "M_TOO_LARGE"

    # A Content-Length that lies about the size.
    r = await gateway.client.post(
        SIGN_PATH, content=body, headers={**headers, "Content-Length": "100"}
    )
    assert r.status_code == 413

    # No Content-Length at all (chunked).
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = await gateway.client.post(SIGN_PATH, content=chunks(), headers=headers)
    assert r.status_code == 413
    assert r.json()["errcode"] == "M_TOO_LARGE"
    assert too_large_count() == before + 3


async def test_a_body_at_the_limit_is_read(
    make_gateway: GatewayFactory, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    gateway = await make_gateway(max_pdu_bytes=LIMIT)
    await start_worker()
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12", body="")
    padding = LIMIT - len(orjson.dumps(event))
    event = origin.event(room_id, "12", body="y" * padding)
    body = orjson.dumps(event)
    assert len(body) == LIMIT

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i : i + 512]

    r = await gateway.client.post(
        SIGN_PATH, content=chunks(), headers=origin.headers(SIGN_PATH, event)
    )
    assert r.status_code == 200, r.text

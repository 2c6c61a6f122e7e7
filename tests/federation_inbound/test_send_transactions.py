"""``PUT /_matrix/federation/v1/send/{txnId}``: authentication, per-origin deduplication,
the spec's limits, garbage, and what reaches JetStream."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as aioredis

from tests.federation_inbound.conftest import InboundGateway, ProtectRoom
from tests.gateway.policy_harness import GATEWAY_NAME, Origin, new_room_id
from tests.private_redis import PrivateRedis
from warden.bus.subjects import (
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_ROOM_ID,
    HEADER_ROOM_VERSION,
)
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version


def event_id_of(room_version: str, event: dict[str, object]) -> str:
    return str(compute_event_id(get_room_version(room_version), event))


def txn(origin: Origin, pdus: list[object], edus: list[object] | None = None) -> dict[str, object]:
    return {
        "origin": origin.name,
        "origin_server_ts": 1_700_000_000_000,
        "pdus": pdus,
        "edus": edus if edus is not None else [],
    }


async def test_pdus_of_protected_rooms_are_published_once_with_their_headers(
    inbound_gateway: InboundGateway,
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
) -> None:
    v11 = await protect_room(new_room_id("11"), "11")
    v12 = await protect_room(new_room_id("12"), "12")
    good11 = origin.event(v11, "11", body="one")
    good12 = origin.event(v12, "12", body="two")
    bad_hash = origin.event(v11, "11", body="three")
    bad_hash["content"]["body"] = "tampered"
    unknown = origin.event(new_room_id("11"), "11", body="elsewhere")
    garbage: list[object] = [7, "x", None, [], {"room_id": 5}, {"room_id": v11}]
    body = txn(origin, [good11, good12, bad_hash, unknown, *garbage], [{"edu_type": "m.typing"}])

    r = await inbound_gateway.send(origin, txn_id(), body)
    assert r.status_code == 200, r.text
    pdus = r.json()["pdus"]
    assert pdus[event_id_of("11", good11)] == {}
    assert pdus[event_id_of("12", good12)] == {}
    assert "content hash" in pdus[event_id_of("11", bad_hash)]["error"]
    assert event_id_of("11", unknown) not in pdus  # unknown room: left out
    assert len(pdus) == 4  # the two good ones, the bad hash, and {"room_id": v11}

    msgs = await inbound_gateway.published.fetch(expect=3)
    assert len(msgs) == 2
    by_id = {m.headers[HEADER_EVENT_ID]: m for m in msgs}
    m11 = by_id[event_id_of("11", good11)]
    assert orjson.loads(m11.data) == good11
    assert m11.headers[HEADER_ORIGIN] == origin.name
    assert m11.headers[HEADER_ROOM_ID] == v11
    assert m11.headers[HEADER_ROOM_VERSION] == "11"
    msg_id = m11.headers["Nats-Msg-Id"]
    assert msg_id.startswith(event_id_of("11", good11) + "/")
    assert msg_id.endswith(f"@{origin.name}")
    assert by_id[event_id_of("12", good12)].headers[HEADER_ROOM_VERSION] == "12"


async def test_a_repeated_transaction_gets_the_first_answer_and_is_not_processed_again(
    inbound_gateway: InboundGateway,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
) -> None:
    origin, relay = await start_origin(), await start_origin()
    room = await protect_room(new_room_id("10"), "10")
    first = origin.event(room, "10", body="first")
    other = origin.event(room, "10", body="other")
    tid = txn_id()

    r1 = await inbound_gateway.send(origin, tid, txn(origin, [first]))
    assert r1.status_code == 200
    # Same origin, same transaction ID, different content: answered from the cache.
    r2 = await inbound_gateway.send(origin, tid, txn(origin, [other]))
    assert r2.status_code == 200
    assert r2.json() == r1.json() == {"pdus": {event_id_of("10", first): {}}}
    # Another origin may use the same transaction ID: it is its own transaction.
    r3 = await inbound_gateway.send(relay, tid, txn(relay, [first, other]))
    assert r3.json() == {"pdus": {event_id_of("10", first): {}, event_id_of("10", other): {}}}

    msgs = await inbound_gateway.published.fetch(expect=4)
    # Once per origin: `first` through both (the worker drops a copy whose origin is
    # not in the room, which must not shadow another origin's), `other` once.
    assert sorted((m.headers[HEADER_EVENT_ID], m.headers[HEADER_ORIGIN]) for m in msgs) == sorted(
        [
            (event_id_of("10", first), origin.name),
            (event_id_of("10", first), relay.name),
            (event_id_of("10", other), relay.name),
        ]
    )


async def test_a_hung_redis_costs_one_transaction_its_timeout_then_is_skipped(
    make_inbound_gateway: Callable[..., Awaitable[InboundGateway]],
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
) -> None:
    """M6 for /send: a Redis that stops answering (paused) costs the first transaction
    its socket timeout; the next ones go without deduplication at once; once Redis
    answers again (after the 1 s skip) repeats are deduplicated again."""
    server = PrivateRedis()
    server.start()
    redis = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        gateway = await make_inbound_gateway(redis=redis)
        room = await protect_room(new_room_id("12"), "12")
        await redis.ping()  # connected before the pause
        server.pause()
        loop = asyncio.get_running_loop()
        took = []
        for body in ("first", "second", "third"):
            began = loop.time()
            r = await gateway.send(
                origin, txn_id(), txn(origin, [origin.event(room, "12", body=body)])
            )
            took.append(loop.time() - began)
            assert r.status_code == 200, r.text
        assert took[0] >= 0.5  # waited for the hung Redis
        assert max(took[1:]) < 0.4, took  # skipped it
        assert len(await gateway.published.fetch(expect=3)) == 3

        server.resume()
        await asyncio.sleep(1.1)
        tid = txn_id()
        first = origin.event(room, "12", body="fourth")
        r1 = await gateway.send(origin, tid, txn(origin, [first]))
        r2 = await gateway.send(origin, tid, txn(origin, [origin.event(room, "12", body="other")]))
        assert r1.json() == r2.json() == {"pdus": {event_id_of("12", first): {}}}
    finally:
        await redis.aclose()
        server.stop()


async def test_authentication_limits_and_garbage_are_4xx_matrix_errors(
    inbound_gateway: InboundGateway,
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
) -> None:
    room = await protect_room(new_room_id("11"), "11")
    event = origin.event(room, "11")
    body = txn(origin, [event])
    client = inbound_gateway.client

    def check(r: object, status: int, errcode: str) -> None:
        assert r.status_code == status, r.text  # type: ignore[attr-defined]
        assert r.json()["errcode"] == errcode  # type: ignore[attr-defined]

    uri = f"/_matrix/federation/v1/send/{txn_id()}"
    check(await client.put(uri, json=body), 401, "M_UNAUTHORIZED")
    altered = copy.deepcopy(body)
    altered["origin_server_ts"] = 1
    check(
        await inbound_gateway.send(origin, txn_id(), altered, sign_as=body), 401, "M_UNAUTHORIZED"
    )
    check(
        await inbound_gateway.send(origin, txn_id(), {**body, "origin": "evil.example"}),
        403,
        "M_FORBIDDEN",
    )
    check(
        await inbound_gateway.send(origin, txn_id(), txn(origin, [event] * 51)), 400, "M_BAD_JSON"
    )
    check(
        await inbound_gateway.send(origin, txn_id(), txn(origin, [], [{}] * 101)), 400, "M_BAD_JSON"
    )
    check(await inbound_gateway.send(origin, txn_id(), {"origin": origin.name}), 400, "M_BAD_JSON")
    check(
        await inbound_gateway.send(origin, txn_id(), {**body, "pdus": {"a": 1}}), 400, "M_BAD_JSON"
    )
    check(await inbound_gateway.send(origin, txn_id(), {**body, "edus": 3}), 400, "M_BAD_JSON")
    check(await inbound_gateway.send(origin, txn_id(), body, raw=b"{not json"), 400, "M_NOT_JSON")
    check(await inbound_gateway.send(origin, txn_id(), [1], raw=b"[1]"), 400, "M_NOT_JSON")
    check(
        await inbound_gateway.send(origin, txn_id(), body, raw=b'{"pdus": [], "x": 1.5}'),
        400,
        "M_BAD_JSON",
    )
    # Exactly at the limits is fine.
    r = await inbound_gateway.send(origin, txn_id(), txn(origin, [event] * 50, [{}] * 100))
    assert r.status_code == 200
    assert r.json() == {"pdus": {event_id_of("11", event): {}}}
    assert GATEWAY_NAME  # the destination every signature above names


async def test_user_devices_and_profile_answer_for_wardens_user_only(
    inbound_gateway: InboundGateway, origin: Origin
) -> None:
    from warden.federation.xmatrix import sign_request

    async def get(uri: str) -> object:
        auth = sign_request(origin.name, GATEWAY_NAME, "GET", uri, None, origin.key)
        return await inbound_gateway.client.get(uri, headers={"Authorization": auth})

    me = f"@policyserv:{GATEWAY_NAME}"
    r = await get(f"/_matrix/federation/v1/user/devices/{me}")
    assert r.status_code == 200  # type: ignore[attr-defined]
    assert r.json() == {"user_id": me, "stream_id": 1, "devices": []}  # type: ignore[attr-defined]
    r = await get(f"/_matrix/federation/v1/user/devices/@other:{GATEWAY_NAME}")
    assert r.status_code == 404 and r.json()["errcode"] == "M_NOT_FOUND"  # type: ignore[attr-defined]

    r = await get(f"/_matrix/federation/v1/query/profile?user_id={me}&field=displayname")
    assert r.status_code == 200 and r.json() == {"displayname": "Warden policy server"}  # type: ignore[attr-defined]
    r = await get(f"/_matrix/federation/v1/query/profile?user_id={me}")
    assert r.json() == {"displayname": "Warden policy server"}  # type: ignore[attr-defined]
    r = await get(f"/_matrix/federation/v1/query/profile?user_id={me}&field=avatar_url")
    assert r.status_code == 200 and r.json() == {}  # type: ignore[attr-defined]
    r = await get("/_matrix/federation/v1/query/profile?user_id=@x:elsewhere.example")
    assert r.status_code == 404 and r.json()["errcode"] == "M_NOT_FOUND"  # type: ignore[attr-defined]
    r = await get("/_matrix/federation/v1/query/profile")
    assert r.status_code == 400 and r.json()["errcode"] == "M_MISSING_PARAM"  # type: ignore[attr-defined]

    unsigned = await inbound_gateway.client.get(f"/_matrix/federation/v1/user/devices/{me}")
    assert unsigned.status_code == 401

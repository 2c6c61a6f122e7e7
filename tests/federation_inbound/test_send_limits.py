"""``/send`` limits and bounds (issue 10: M1, L1, L3, M8): the transaction ID cap, the
per-origin budget, one room query per transaction, the spec's PDU size, dedup keys that
cannot collide across origins, deduplication that a corrupted copy cannot abuse, and a
full inbound stream answering 503 instead of dropping unjudged PDUs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy
from prometheus_client import REGISTRY
from signedjson.key import get_verify_key
from unpaddedbase64 import decode_base64, encode_base64

from tests.federation_inbound.conftest import (
    InboundFactory,
    InboundGateway,
    ProtectRoom,
    origin_settings,
)
from tests.gateway.policy_harness import GATEWAY_NAME, Origin, StandInWorker, new_room_id
from warden import redis_keys
from warden.bus.consumer import ACK, Delivery
from warden.bus.streams import INBOUND_STREAM, ensure_inbound_stream, inbound_stream_config
from warden.bus.subjects import EVALUATE_SUBJECT, HEADER_EVENT_ID, HEADER_ORIGIN, HEADER_ROOM_ID
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.keys import verify_key_base64
from warden.matrix.room_versions import get_room_version
from warden.runtime.identity import Identity
from warden.settings import Settings
from warden.storage import room_state
from warden_filter_worker.room_state_consumer import RoomStateConsumer
from warden_gateway.room_cache import RoomCache

NOW = 1_800_000_025.0  # 25 s into a 60 s window


def event_id_of(room_version: str, event: dict[str, Any]) -> str:
    return str(compute_event_id(get_room_version(room_version), event))


def txn(origin: Origin, pdus: list[Any]) -> dict[str, Any]:
    return {"origin": origin.name, "origin_server_ts": 1_700_000_000_000, "pdus": pdus}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_transaction_ids_longer_than_255_bytes_are_refused(
    inbound_gateway: InboundGateway,
    origin: Origin,
    redis_client: aioredis.Redis,
) -> None:
    long_id = "t" * 254 + "é"  # 256 bytes in UTF-8
    r = await inbound_gateway.send(origin, long_id, txn(origin, []))
    assert r.status_code == 400, r.text
    assert r.json()["errcode"] == "M_INVALID_PARAM"
    assert await redis_client.keys("warden:txn:*") == []
    ok_id = "t" * 255
    r = await inbound_gateway.send(origin, ok_id, txn(origin, []))
    assert r.status_code == 200, r.text


async def test_transactions_without_pdus_leave_nothing_in_redis(
    inbound_gateway: InboundGateway, origin: Origin, redis_client: aioredis.Redis
) -> None:
    edus = {**txn(origin, []), "edus": [{"edu_type": "m.typing", "content": {}}]}
    for _ in range(2):
        r = await inbound_gateway.send(origin, "edus-only", edus)
        assert r.status_code == 200, r.text
        assert r.json() == {"pdus": {}}
    assert await redis_client.keys("warden:txn:*") == []


async def test_each_origin_has_a_send_budget(
    make_inbound_gateway: InboundFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_inbound_gateway(send_limit=10, rate_clock=lambda: NOW)
    busy, quiet = await start_origin(), await start_origin()
    room = await protect_room(new_room_id("12"), "12")
    pdus = [busy.event(room, "12", body=f"m{i}") for i in range(5)]

    r = await gateway.send(busy, txn_id(), txn(busy, pdus))  # costs 6 of 10
    assert r.status_code == 200, r.text
    r = await gateway.send(busy, txn_id(), txn(busy, [busy.event(room, "12")] * 4))  # 5 more
    assert r.status_code == 429, r.text
    assert r.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert r.json()["retry_after_ms"] == 35_000
    # A refused transaction was not processed: no dedup entry, nothing published.
    assert len(await gateway.published.fetch(expect=10, timeout=1.5)) == 5
    r = await gateway.send(quiet, txn_id(), txn(quiet, [quiet.event(room, "12")]))
    assert r.status_code == 200  # another origin has its own budget
    assert sample("warden_federation_transactions_total", outcome="rate_limited") >= 1


async def test_one_room_query_per_transaction_whatever_the_rooms(
    make_inbound_gateway: InboundFactory,
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
    pg_database: str,
) -> None:
    queries: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: queries.append(q.query))

    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=4, init=init)
    assert pool is not None
    try:
        gateway = await make_inbound_gateway(room_pool=pool)
        room = await protect_room(new_room_id("12"), "12")
        good = origin.event(room, "12")
        strangers = [origin.event(new_room_id("12"), "12", body=str(i)) for i in range(49)]
        r = await gateway.send(origin, txn_id(), txn(origin, [good, *strangers]))
        assert r.status_code == 200, r.text
        assert r.json() == {"pdus": {event_id_of("12", good): {}}}
        room_queries = [q for q in queries if "FROM rooms" in q]
        assert len(room_queries) == 1, room_queries
    finally:
        await pool.close()


async def test_a_pdu_over_the_spec_size_gets_an_error_and_is_not_published(
    inbound_gateway: InboundGateway,
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
) -> None:
    room = await protect_room(new_room_id("12"), "12")
    good = origin.event(room, "12", body="fine")
    big = origin.event(room, "12", body="x" * 70_000)  # over 65,536, under NATS's 1 MiB
    r = await inbound_gateway.send(origin, txn_id(), txn(origin, [good, big]))
    assert r.status_code == 200, r.text
    pdus = r.json()["pdus"]
    assert pdus[event_id_of("12", good)] == {}
    assert "65536" in pdus[event_id_of("12", big)]["error"]
    msgs = await inbound_gateway.published.fetch(expect=2, timeout=1.5)
    assert [m.headers[HEADER_EVENT_ID] for m in msgs] == [event_id_of("12", good)]


async def seed_key(redis_client: aioredis.Redis, origin: Origin) -> None:
    """Put ``origin``'s key where every gateway replica looks first (as if fetched)."""
    value = {
        "key": verify_key_base64(origin.key),
        "valid_until_ts": int(time.time() * 1000) + 3_600_000,
        "expired": False,
    }
    await redis_client.set(
        redis_keys.server_key(origin.name, origin.key_id), orjson.dumps(value), ex=3600
    )


async def test_dedup_keys_of_origins_differing_by_a_port_do_not_collide(
    inbound_gateway: InboundGateway,
    origin: Origin,
    protect_room: ProtectRoom,
    redis_client: aioredis.Redis,
) -> None:
    # ``origin`` is 127.0.0.1:<port>; ``bare`` is 127.0.0.1, whose key is cached (nothing
    # listens on 127.0.0.1:8448).
    bare = Origin(name="127.0.0.1")
    await seed_key(redis_client, bare)
    port = origin.name.rpartition(":")[2]
    tid = uuid.uuid4().hex
    room = await protect_room(new_room_id("12"), "12")
    event = origin.event(room, "12")

    # 127.0.0.1 sends "<port>:<tid>", then 127.0.0.1:<port> sends "<tid>": the same
    # "warden:txn:127.0.0.1:<port>:<tid>" before.
    elsewhere = bare.event(new_room_id("12"), "12")  # a room Warden does not protect
    r = await inbound_gateway.send(bare, f"{port}%3A{tid}", txn(bare, [elsewhere]))
    assert r.status_code == 200, r.text
    assert r.json() == {"pdus": {}}
    assert await redis_client.get(redis_keys.transaction(bare.name, f"{port}:{tid}")) is not None
    r = await inbound_gateway.send(origin, tid, txn(origin, [event]))
    assert r.status_code == 200, r.text
    assert r.json() == {"pdus": {event_id_of("12", event): {}}}
    msgs = await inbound_gateway.published.fetch(expect=1)
    assert [m.headers[HEADER_EVENT_ID] for m in msgs] == [event_id_of("12", event)]


def flip_signature_byte(event: dict[str, Any], server: str) -> dict[str, Any]:
    corrupted = orjson.loads(orjson.dumps(event))
    sigs = corrupted["signatures"][server]
    key_id = next(iter(sigs))
    raw = bytearray(decode_base64(sigs[key_id]))
    raw[0] ^= 1
    sigs[key_id] = encode_base64(bytes(raw))
    return corrupted


async def test_a_corrupted_copy_relayed_first_does_not_suppress_the_real_event(
    inbound_gateway: InboundGateway,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
    make_settings: Callable[..., Settings],
    tls_ca_file: str,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    identity: Identity,
) -> None:
    sender, relay = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("11"), "11")
    alice = f"@alice:{sender.name}"
    create = sender.event(
        room_id, "11", event_type="m.room.create", state_key="", content={"room_version": "11"}
    )
    join = sender.event(
        room_id,
        "11",
        event_type="m.room.member",
        state_key=alice,
        content={"membership": "join"},
        sender=alice,
    )
    power = sender.event(
        room_id,
        "11",
        event_type="m.room.power_levels",
        state_key="",
        content={"users": {alice: 100}},
    )
    # The relay is in the room too: a server outside it is not heard at all (the origin
    # rule), so its copy would not even reach the signature check.
    relay_user = f"@r:{relay.name}"
    relay_join = relay.event(
        room_id,
        "11",
        event_type="m.room.member",
        state_key=relay_user,
        content={"membership": "join"},
        sender=relay_user,
    )
    await room_state.seed_from_state(pg_pool, room_id, "11", [create, join, power, relay_join])
    # X: alice raises bob's power level. The relay sends a copy with one signature byte
    # flipped first, then the sender sends the real one.
    bob = f"@bob:{sender.name}"
    real = sender.event(
        room_id,
        "11",
        event_type="m.room.power_levels",
        state_key="",
        content={"users": {alice: 100, bob: 50}},
        sender=alice,
    )
    corrupted = flip_signature_byte(real, sender.name)
    r = await inbound_gateway.send(relay, txn_id(), txn(relay, [corrupted]))
    assert r.status_code == 200, r.text
    r = await inbound_gateway.send(sender, txn_id(), txn(sender, [real]))
    assert r.status_code == 200, r.text

    msgs = await inbound_gateway.published.fetch(expect=3, timeout=2)
    assert [m.headers[HEADER_ORIGIN] for m in msgs] == [relay.name, sender.name]

    # What the filter workers' room-state consumer makes of the stream: the corrupted
    # copy is dropped, the real one learned.
    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"
    settings = origin_settings(make_settings, tls_ca_file)
    federation = FederationClient(settings, identity.federation_key)
    keyring = Keyring(
        settings,
        federation,
        redis_client,
        pg_pool,
        our_server_name=GATEWAY_NAME,
        our_keys={identity.federation_key_id: get_verify_key(identity.federation_key)},
    )
    consumer = RoomStateConsumer(
        pool=pg_pool,
        nc=nats_client,
        js=nats_client.jetstream(),
        keyring=keyring,
        server_name=GATEWAY_NAME,
        policy_verify_key=get_verify_key(identity.policy_key),
        local_user_id=f"@policyserv:{GATEWAY_NAME}",
        verdict_timeout_seconds=5.0,
        evaluate_subject=subject,
    )
    worker = await StandInWorker(nats_client, subject).start()  # judges it neutral
    try:
        bad_before = sample("warden_room_state_pdus_total", outcome="bad_signature")
        for m in msgs:
            assert m.headers[HEADER_ROOM_ID] == room_id
            disposition = await consumer.handle(
                Delivery(
                    subject=m.subject,
                    data=m.data,
                    headers=dict(m.headers),
                    attempt=1,
                    stream_sequence=m.metadata.sequence.stream,
                )
            )
            assert disposition == ACK
        assert sample("warden_room_state_pdus_total", outcome="bad_signature") == bad_before + 1
        levels = await room_state.get_power_levels(pg_pool, room_id)
        assert levels == {"users": {alice: 100, bob: 50}}
    finally:
        await worker.stop()
        await federation.aclose()


async def test_the_inbound_stream_refuses_new_messages_when_full(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    await ensure_inbound_stream(js)
    info = await js.stream_info(INBOUND_STREAM)
    assert info.config.discard == DiscardPolicy.NEW


async def test_a_full_inbound_stream_is_a_503_and_the_transaction_is_not_acknowledged(
    make_inbound_gateway: InboundFactory,
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
    nats_client: NATS,
    redis_client: aioredis.Redis,
) -> None:
    js = nats_client.jetstream()
    suffix = uuid.uuid4().hex[:10]
    stream = f"TEST_FULL_{suffix}"
    subject = f"warden.testfull.{suffix}.pdu"
    await js.add_stream(
        inbound_stream_config(stream, [f"warden.testfull.{suffix}.>"], max_bytes=4096)
    )
    try:
        gateway = await make_inbound_gateway(stream=stream, subject=subject)
        room = await protect_room(new_room_id("12"), "12")
        first = origin.event(room, "12", body="a" * 2000)
        r = await gateway.send(origin, txn_id(), txn(origin, [first]))
        assert r.status_code == 200, r.text

        full_before = sample("warden_inbound_publish_failures_total", reason="stream_full")
        tid = txn_id()
        later = [origin.event(room, "12", body="b" * 2000) for _ in range(3)]
        for _ in range(2):  # the origin retries: handled again, never a cached answer
            r = await gateway.send(origin, tid, txn(origin, later))
            assert r.status_code == 503, r.text
            assert r.json()["errcode"] == "M_UNKNOWN"
        assert sample("warden_inbound_publish_failures_total", reason="stream_full") > full_before
        assert await redis_client.get(redis_keys.transaction(origin.name, tid)) is None
        # The first PDU is still there: nothing unjudged was dropped to make room.
        msgs = await gateway.published.fetch(expect=5, timeout=1.5)
        assert msgs[0].headers[HEADER_EVENT_ID] == event_id_of("12", first)
    finally:
        await js.delete_stream(stream)


async def test_made_up_rooms_in_transactions_do_not_evict_protected_rooms_from_the_cache(
    pg_database: str, protect_room: ProtectRoom
) -> None:
    queries: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda q: queries.append(q.query))

    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=2, init=init)
    assert pool is not None
    try:
        rooms = RoomCache(pool, size=10)
        protected = await protect_room(new_room_id("12"), "12")
        assert await rooms.get(protected) is not None
        made_up = [new_room_id("12") for _ in range(50)]
        found = await rooms.get_many([protected, *made_up])
        assert found[protected] is not None and all(found[r] is None for r in made_up)
        before = len(queries)
        assert await rooms.get(protected) is not None
        assert len(queries) == before  # still cached: answered without a query
    finally:
        await pool.close()

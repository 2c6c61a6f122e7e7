"""The filter workers' room-state consumer and the periodic refresh, in process, against
real PostgreSQL, Redis, NATS and HTTPS origins."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from signedjson.key import get_verify_key
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    Origin,
    StandInWorker,
    new_room_id,
    verdict_for,
)
from tests.moderator.verdict_stream import fresh_durable
from tests.room_state.room_setup import seed_room
from warden import redis_keys
from warden.bus.consumer import ACK, Delivery, Retry
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import (
    EVALUATE_SUBJECT,
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_ROOM_ID,
    HEADER_SOURCE,
    VERDICTS_STREAM,
    verdict_subject,
)
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.event_signing import sign_event
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version
from warden.policy.verdict import ContentClass, Verdict
from warden.runtime.identity import Identity
from warden.storage import room_state
from warden.storage.displaynames import get_displaynames
from warden.storage.rooms import put_room
from warden_filter_worker.room_state_consumer import RoomStateConsumer
from warden_filter_worker.state_refresh import StateRefresher

OUR_USER = f"@policyserv:{GATEWAY_NAME}"


async def start_origin(https_server: Any, extra_routes: list[Route] | None = None) -> Origin:
    origin = Origin()
    app = Starlette(routes=[*origin.key_server_app().routes, *(extra_routes or [])])
    local = await https_server(app, host="127.0.0.1", names=["127.0.0.1"])
    origin.name = local.address
    return origin


def delivery(pdu: dict[str, Any], room_id: str, origin: str, attempt: int = 1) -> Delivery:
    return Delivery(
        subject="warden.inbound.pdu",
        data=orjson.dumps(pdu),
        headers={HEADER_ORIGIN: origin, HEADER_ROOM_ID: room_id},
        attempt=attempt,
        stream_sequence=1,
    )


def make_consumer(
    pg_pool: asyncpg.Pool, nc: NATS, keyring: Keyring, identity: Identity, subject: str
) -> RoomStateConsumer:
    return RoomStateConsumer(
        pool=pg_pool,
        nc=nc,
        js=nc.jetstream(),
        keyring=keyring,
        server_name=GATEWAY_NAME,
        policy_verify_key=get_verify_key(identity.policy_key),
        local_user_id=OUR_USER,
        verdict_timeout_seconds=5.0,
        evaluate_subject=subject,
    )


async def test_state_is_learned_bad_signatures_dropped_and_bypassing_events_judged(
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    origin = await start_origin(https_server)
    room = await put_room(pg_pool, new_room_id("12"), "12", "default")
    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"
    judged: list[Msg] = []

    def decide(msg: Msg) -> Verdict:
        judged.append(msg)
        return verdict_for(msg, ContentClass.NEUTRAL)

    worker = await StandInWorker(nats_client, subject, decide).start()
    consumer = make_consumer(pg_pool, nats_client, keyring, warden_identity, subject)
    rid = room.room_id
    alice = f"@alice:{origin.name}"
    # What the join taught Warden: a creator, alice with power 100, Warden's user in.
    await seed_room(
        pg_pool,
        origin,
        rid,
        "12",
        members={f"@creator:{origin.name}": 100, alice: 100},
        extra_joined=(OUR_USER,),
        our_user_id=OUR_USER,
    )
    try:
        join = origin.event(
            rid,
            "12",
            event_type="m.room.member",
            state_key=alice,
            content={"membership": "join", "displayname": "Alice A"},
        )
        power = origin.event(
            rid,
            "12",
            event_type="m.room.power_levels",
            state_key="",
            content={"users": {alice: 100}},
        )
        policy = origin.event(
            rid,
            "12",
            event_type="m.room.policy",
            state_key="",
            content={
                "via": GATEWAY_NAME,
                "public_keys": {"ed25519": warden_identity.policy_key_base64},
            },
        )
        for ev in (join, power, policy):
            assert await consumer.handle(delivery(ev, rid, origin.name)) == ACK
        assert (await get_displaynames(pg_pool, rid))[alice] == "Alice A"
        assert await room_state.get_power_levels(pg_pool, rid) == {"users": {alice: 100}}
        ps = await room_state.get_policy_server(
            pg_pool, rid, GATEWAY_NAME, warden_identity.policy_key_base64
        )
        assert ps.uses_warden and ps.key_matches
        # Power levels were judged (unsigned by Warden); m.room.policy never is, nor are
        # membership events: homeservers never ask about their local ones.
        assert len(judged) == 1
        assert judged[0].headers[HEADER_EVENT_ID] == compute_event_id(get_room_version("12"), power)
        kick = origin.event(
            rid,
            "12",
            event_type="m.room.member",
            state_key=OUR_USER,
            content={"membership": "leave", "reason": "policy server removed"},
        )
        assert await consumer.handle(delivery(kick, rid, origin.name)) == ACK
        assert len(judged) == 1  # a kick of Warden is learned, not judged or punished
        assert all(m.headers[HEADER_SOURCE] == "send" for m in judged)
        assert all(m.headers[HEADER_ORIGIN] == GATEWAY_NAME for m in judged)

        # A forged event (signature does not verify) changes nothing.
        forged = origin.event(
            rid, "12", event_type="m.room.power_levels", state_key="", content={"users": {alice: 0}}
        )
        forged["content"]["users"]["@mallory:evil.org"] = 100
        assert await consumer.handle(delivery(forged, rid, origin.name)) == ACK
        assert await room_state.get_power_levels(pg_pool, rid) == {"users": {alice: 100}}

        # An event carrying Warden's valid signature was already judged: not asked again.
        version = get_room_version("12")
        signed = origin.event(rid, "12", body="signed by warden")
        sign_event(version, signed, GATEWAY_NAME, warden_identity.policy_key, POLICY_SERVER_KEY_ID)
        count = len(judged)
        assert await consumer.handle(delivery(signed, rid, origin.name)) == ACK
        assert len(judged) == count

        # An unknown room is retried a few times (another deployment's worker may know
        # it), then dropped.
        other = origin.event(new_room_id("12"), "12")
        assert isinstance(await consumer.handle(delivery(other, "!nope", origin.name)), Retry)
        assert await consumer.handle(delivery(other, "!nope", origin.name, attempt=5)) == ACK
    finally:
        await worker.stop()


async def test_a_refusal_first_given_to_the_senders_own_server_is_sent_for_redaction(
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    origin = await start_origin(https_server)
    room = await put_room(pg_pool, new_room_id("11"), "11", "default")
    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"

    def refused_earlier_to_sender(msg: Msg) -> Verdict:
        v = verdict_for(msg, ContentClass.PROHIBITED, ("org.matrix.msc4456.spam",))
        # As /sign recorded it when the sender's own server asked.
        import dataclasses

        return dataclasses.replace(
            v, origin=origin.name, room_id=room.room_id, sender=f"@bob:{origin.name}"
        )

    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    durable = f"test-redact-{uuid.uuid4().hex[:8]}"
    await fresh_durable(js, durable)
    worker = await StandInWorker(nats_client, subject, refused_earlier_to_sender).start()
    consumer = make_consumer(pg_pool, nats_client, keyring, warden_identity, subject)
    await seed_room(pg_pool, origin, room.room_id, "11", members={f"@bob:{origin.name}": 0})
    try:
        ev = origin.event(
            room.room_id, "11", body="spam that was refused", sender=f"@bob:{origin.name}"
        )
        event_id = str(compute_event_id(get_room_version("11"), ev))
        assert await consumer.handle(delivery(ev, room.room_id, origin.name)) == ACK
        sub = await js.pull_subscribe_bind(durable=durable, stream=VERDICTS_STREAM)
        found: Verdict | None = None
        deadline = time.monotonic() + 10
        while found is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                for m in await sub.fetch(batch=10, timeout=1):
                    await m.ack()
                    v = Verdict.from_json(m.data)
                    if v.event_id == event_id:
                        assert m.subject == verdict_subject("prohibited")
                        assert m.headers["Nats-Msg-Id"] == f"{event_id}/send"
                        found = v
        assert found is not None
        # The moderator skips only a verdict whose origin is the sender's server.
        assert found.origin == GATEWAY_NAME and found.extra["source"] == "send"
        await sub.unsubscribe()
    finally:
        await worker.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(VERDICTS_STREAM, durable)


async def test_periodic_refresh_replaces_drifted_state_one_worker_at_a_time(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    federation: FederationClient,
    keyring: Keyring,
    https_server: Any,
) -> None:
    state_events: list[dict[str, Any]] = []
    asked: list[str] = []

    async def state(request: Request) -> Response:
        asked.append(request.query_params.get("event_id", ""))
        body = {"pdus": state_events, "auth_chain": []}
        return Response(orjson.dumps(body), media_type="application/json")

    origin = await start_origin(
        https_server, [Route("/_matrix/federation/v1/state/{room_id}", state)]
    )
    room = await put_room(pg_pool, new_room_id("11", origin.name), "11", "default")
    rid = room.room_id
    # Drifted learned state: a stale power level and a member who has since left.
    await room_state.apply_event(
        pg_pool,
        rid,
        origin.event(rid, "11", event_type="m.room.power_levels", state_key="", content={"ban": 1}),
        "$old",
    )
    await room_state.apply_event(
        pg_pool,
        rid,
        origin.event(
            rid,
            "11",
            event_type="m.room.member",
            state_key="@gone:x.org",
            content={"membership": "join"},
        ),
        "$latest",
    )
    alice = f"@alice:{origin.name}"
    good_pl = origin.event(
        rid, "11", event_type="m.room.power_levels", state_key="", content={"ban": 50}
    )
    forged_acl = origin.event(
        rid, "11", event_type="m.room.server_acl", state_key="", content={"deny": ["*"]}
    )
    forged_acl["content"]["allow"] = []  # breaks the hash and signature
    member = origin.event(
        rid,
        "11",
        event_type="m.room.member",
        state_key=alice,
        content={"membership": "join", "displayname": "Alice"},
    )
    create = origin.event(
        rid, "11", event_type="m.room.create", state_key="", content={"room_version": "11"}
    )
    state_events.extend([create, good_pl, forged_acl, member])

    def refresher() -> StateRefresher:
        return StateRefresher(
            pool=pg_pool,
            redis=redis_client,
            client=federation,
            keyring=keyring,
            trusted_origins=["127.0.0.1:1", origin.name],  # the first does not answer
            interval_seconds=3600,
            local_user_id=OUR_USER,
        )

    a, b = refresher(), refresher()
    results = await asyncio.gather(a.refresh_if_due(), b.refresh_if_due())
    assert sorted(results) == [False, True]  # one worker refreshed, the other found the lock
    # Anchored at the latest event seen (other tests' rooms in this database are asked too).
    assert asked.count("$latest") == 1
    assert await room_state.get_power_levels(pg_pool, rid) == {"ban": 50}
    assert await room_state.get_server_acl(pg_pool, rid) is None  # forged: left out
    assert await get_displaynames(pg_pool, rid) == {alice: "Alice"}
    # The lock stays for one interval: nobody refreshes again before it is due.
    assert not await a.refresh_if_due()
    assert await redis_client.pttl(redis_keys.state_refresh_lock()) > 60_000
    await redis_client.delete(redis_keys.state_refresh_lock())
    assert await b.refresh_if_due()
    assert asked.count("$latest") == 2


async def test_refresh_loop_runs_and_stops(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    federation: FederationClient,
    keyring: Keyring,
) -> None:
    r = StateRefresher(
        pool=pg_pool,
        redis=redis_client,
        client=federation,
        keyring=keyring,
        trusted_origins=[],
        interval_seconds=0.05,
        local_user_id=OUR_USER,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(r.run(stopping))
    for _ in range(200):
        if r.runs >= 2:
            break
        await asyncio.sleep(0.05)
    stopping.set()
    await asyncio.wait_for(task, 10)
    assert r.runs >= 2


async def test_refresh_keeps_the_change_made_by_its_anchor_event(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    federation: FederationClient,
    keyring: Keyring,
    https_server: Any,
) -> None:
    # /state?event_id=X answers the state *before* X. When X is itself a state event
    # (here: the power levels change), the refresh must not undo it.
    from warden.matrix.event_hashes import compute_event_id
    from warden.matrix.room_versions import get_room_version

    served: dict[str, dict[str, Any]] = {}
    before: list[dict[str, Any]] = []

    async def state(request: Request) -> Response:
        return Response(orjson.dumps({"pdus": before, "auth_chain": []}))

    async def event(request: Request) -> Response:
        pdu = served.get(request.path_params["event_id"])
        if pdu is None:
            return Response(b'{"errcode":"M_NOT_FOUND","error":"no"}', status_code=404)
        return Response(orjson.dumps({"origin": "x", "origin_server_ts": 1, "pdus": [pdu]}))

    origin = await start_origin(
        https_server,
        [
            Route("/_matrix/federation/v1/state/{room_id}", state),
            Route("/_matrix/federation/v1/event/{event_id:path}", event),
        ],
    )
    rid = (await put_room(pg_pool, new_room_id("11", origin.name), "11", "default")).room_id
    old_pl = origin.event(
        rid, "11", event_type="m.room.power_levels", state_key="", content={"ban": 50}
    )
    new_pl = origin.event(
        rid, "11", event_type="m.room.power_levels", state_key="", content={"ban": 100}
    )
    before.append(
        origin.event(
            rid, "11", event_type="m.room.create", state_key="", content={"room_version": "11"}
        )
    )
    before.append(old_pl)
    new_id = compute_event_id(get_room_version("11"), new_pl)
    served[new_id] = new_pl
    await room_state.apply_event(pg_pool, rid, new_pl, new_id)  # the latest event seen
    refresher = StateRefresher(
        pool=pg_pool,
        redis=redis_client,
        client=federation,
        keyring=keyring,
        trusted_origins=[origin.name],
        interval_seconds=3600,
        local_user_id=OUR_USER,
    )
    await redis_client.delete(redis_keys.state_refresh_lock())
    assert await refresher.refresh_if_due()
    assert await room_state.get_power_levels(pg_pool, rid) == {"ban": 100}
    await redis_client.delete(redis_keys.state_refresh_lock())

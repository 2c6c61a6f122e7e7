"""Learned state is authenticated (issue 10, review H1 and M4): the room-state consumer
learns and judges only PDUs from servers in the room that pass the auth rules as far
as learned state can check them. In process, against real PostgreSQL, Redis, NATS and
HTTPS origins (the attacker is a real server with a fetchable key)."""

from __future__ import annotations

import string
import uuid
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import REGISTRY
from signedjson.key import get_verify_key
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.gateway.policy_harness import GATEWAY_NAME, StandInWorker, new_room_id, verdict_for
from tests.room_state.room_setup import room_snapshot, seed_room
from tests.room_state.test_room_state_consumer import (
    OUR_USER,
    delivery,
    make_consumer,
    start_origin,
)
from warden.bus.consumer import ACK, Retry
from warden.bus.subjects import EVALUATE_SUBJECT
from warden.federation.keyring import Keyring
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.policy.verdict import ContentClass, Verdict
from warden.runtime.identity import Identity
from warden.storage import room_state
from warden.storage.displaynames import get_displaynames
from warden.storage.rooms import get_active_room, put_room
from warden_filter_worker.room_state_consumer import NOT_IN_ROOM_ATTEMPTS, RoomStateConsumer
from warden_filter_worker.state_refresh import StateRefresher

LAST = NOT_IN_ROOM_ATTEMPTS  # the attempt after which a refused PDU is dropped


def pdus_total(outcome: str) -> float:
    return REGISTRY.get_sample_value("warden_room_state_pdus_total", {"outcome": outcome}) or 0.0


async def handled(consumer: RoomStateConsumer, pdu: dict[str, Any], room_id: str, origin: str):  # type: ignore[no-untyped-def]
    """Handle ``pdu`` as its last allowed delivery would be (no retry left)."""
    return await consumer.handle(delivery(pdu, room_id, origin, attempt=LAST))


class Judge:
    """A stand-in filter worker that records what it was asked to judge."""

    def __init__(self) -> None:
        self.asked: list[Msg] = []

    def __call__(self, msg: Msg) -> Verdict:
        self.asked.append(msg)
        return verdict_for(msg, ContentClass.PROHIBITED, ("org.matrix.msc4456.spam",))


async def test_pdus_from_a_server_not_in_the_room_are_neither_learned_nor_judged(
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    resident = await start_origin(https_server)
    attacker = await start_origin(https_server)
    rid = (await put_room(pg_pool, new_room_id("10"), "10", "default")).room_id
    mod = f"@mod:{resident.name}"
    await seed_room(
        pg_pool,
        resident,
        rid,
        "10",
        members={mod: 100, f"@bob:{resident.name}": 0},
        extra_joined=(OUR_USER,),
        our_user_id=OUR_USER,
    )
    before = await get_displaynames(pg_pool, rid)
    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"
    judge = Judge()
    worker = await StandInWorker(nats_client, subject, judge).start()
    consumer = make_consumer(pg_pool, nats_client, keyring, warden_identity, subject)
    try:
        eve = f"@eve:{attacker.name}"
        # The review's H1 (1): 26 joins with single-letter state keys.
        fakes = [
            attacker.event(
                rid,
                "10",
                event_type="m.room.member",
                state_key=letter,
                content={"membership": "join"},
                sender=eve,
            )
            for letter in string.ascii_lowercase
        ]
        # (2) a ban-everyone policy rule; (3) a ban of Warden's user; M4: spam.
        rule = attacker.event(
            rid,
            "10",
            event_type="m.policy.rule.user",
            state_key="rule:all",
            content={"entity": "*", "recommendation": "m.ban", "reason": "x"},
            sender=eve,
        )
        ban = attacker.event(
            rid,
            "10",
            event_type="m.room.member",
            state_key=OUR_USER,
            content={"membership": "ban"},
            sender=eve,
        )
        spam = [attacker.event(rid, "10", body=f"spam {i}", sender=eve) for i in range(5)]
        dropped = pdus_total("origin_not_in_room")
        for pdu in [*fakes, rule, ban, *spam]:
            # Tried again first (the origin's join may be in the same transaction) ...
            first = await consumer.handle(delivery(pdu, rid, attacker.name))
            assert isinstance(first, Retry)
            # ... then dropped.
            assert await handled(consumer, pdu, rid, attacker.name) == ACK
        assert pdus_total("origin_not_in_room") - dropped == 2 * (len(fakes) + 2 + len(spam))
        assert await get_displaynames(pg_pool, rid) == before
        assert await room_state.get_policy_rules(pg_pool, [rid]) == []
        st = await room_state.get_membership_state(pg_pool, rid)
        assert st is not None and st.membership == "join" and st.removed_by is None
        assert await get_active_room(pg_pool, rid) is not None  # still signed for
        assert judge.asked == []  # nothing judged: no verdict, redaction or webhook
        # The refresh anchor did not move to the attacker's events.
        version = get_room_version("10")
        assert st.last_event_id not in {
            compute_event_id(version, pdu) for pdu in [*fakes, rule, ban, *spam]
        }
    finally:
        await worker.stop()


async def test_in_room_pdus_are_learned_only_when_the_auth_rules_allow_them(
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    resident = await start_origin(https_server)
    rogue = await start_origin(https_server)  # in the room through eve, power 0
    rid = (await put_room(pg_pool, new_room_id("10"), "10", "default")).room_id
    mod = f"@mod:{resident.name}"
    eve = f"@eve:{rogue.name}"
    await seed_room(
        pg_pool,
        resident,
        rid,
        "10",
        members={mod: 100, eve: 0},
        extra_joined=(OUR_USER,),
        our_user_id=OUR_USER,
        join_rule="invite",
    )
    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"
    judge = Judge()
    worker = await StandInWorker(nats_client, subject, judge).start()
    consumer = make_consumer(pg_pool, nats_client, keyring, warden_identity, subject)

    async def send(pdu: dict[str, Any], origin: str = rogue.name) -> None:
        assert await handled(consumer, pdu, rid, origin) == ACK

    def member(origin: Any, target: str, membership: str, sender: str, **extra: Any) -> Any:
        return origin.event(
            rid,
            "10",
            event_type="m.room.member",
            state_key=target,
            content={"membership": membership, **extra},
            sender=sender,
        )

    try:
        refused = pdus_total("unauthorised")
        # Member state keys must be user IDs; nobody joins for someone else; the join
        # rule is invite.
        for letter in string.ascii_lowercase:
            await send(member(rogue, letter, "join", eve))
        await send(member(rogue, f"@zz:{rogue.name}", "join", eve))
        await send(member(rogue, f"@zz:{rogue.name}", "join", f"@zz:{rogue.name}"))
        # Not enough power: a ban-everyone rule, more power for eve, a ban of Warden.
        await send(
            rogue.event(
                rid,
                "10",
                event_type="m.policy.rule.user",
                state_key="rule:all",
                content={"entity": "*", "recommendation": "m.ban"},
                sender=eve,
            )
        )
        await send(
            rogue.event(
                rid,
                "10",
                event_type="m.room.power_levels",
                state_key="",
                content={"users": {mod: 100, eve: 100}},
                sender=eve,
            )
        )
        await send(member(rogue, OUR_USER, "ban", eve))
        # A message from a user who is not a member is not judged.
        await send(rogue.event(rid, "10", body="spam", sender=f"@zz:{rogue.name}"))
        assert pdus_total("unauthorised") - refused == 26 + 2 + 3 + 1
        names = await get_displaynames(pg_pool, rid)
        assert set(names) == {mod, eve, OUR_USER}
        assert await room_state.get_policy_rules(pg_pool, [rid]) == []
        assert (await room_state.get_power_levels(pg_pool, rid))["users"] == {mod: 100, eve: 0}
        assert await get_active_room(pg_pool, rid) is not None
        assert judge.asked == []

        # What the rules allow is learned: an invite by the moderator, then the join;
        # eve's message is judged.
        zz = f"@zz:{rogue.name}"
        await send(member(resident, zz, "invite", mod), resident.name)
        await send(member(rogue, zz, "join", zz, displayname="Zed"))
        assert (await get_displaynames(pg_pool, rid))[zz] == "Zed"
        await send(rogue.event(rid, "10", body="spam", sender=eve))
        assert len(judge.asked) == 1
        # A kick of Warden's user by someone with the power counts: /sign for the room
        # then answers as for an unknown room.
        await send(member(resident, OUR_USER, "leave", mod), resident.name)
        st = await room_state.get_membership_state(pg_pool, rid)
        assert st is not None and (st.membership, st.removed_by) == ("leave", mod)
        assert await get_active_room(pg_pool, rid) is None
    finally:
        await worker.stop()


async def test_room_version_12_creators_have_infinite_power(
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    origin = await start_origin(https_server)
    rid = (await put_room(pg_pool, new_room_id("12"), "12", "default")).room_id
    creator, admin = f"@creator:{origin.name}", f"@admin:{origin.name}"
    await seed_room(pg_pool, origin, rid, "12", members={creator: 0, admin: 100})
    consumer = make_consumer(pg_pool, nats_client, keyring, warden_identity, "unused.subject")

    def ban(target: str, sender: str) -> dict[str, Any]:
        return origin.event(
            rid,
            "12",
            event_type="m.room.member",
            state_key=target,
            content={"membership": "ban"},
            sender=sender,
        )

    assert await handled(consumer, ban(creator, admin), rid, origin.name) == ACK
    assert creator in await get_displaynames(pg_pool, rid)  # 100 < infinite
    assert await handled(consumer, ban(admin, creator), rid, origin.name) == ACK
    assert admin not in await get_displaynames(pg_pool, rid)


async def test_caps_bound_learned_members_and_rules(
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    origin = await start_origin(https_server)
    rid = (await put_room(pg_pool, new_room_id("10"), "10", "default")).room_id
    mod = f"@mod:{origin.name}"
    await seed_room(pg_pool, origin, rid, "10", members={mod: 100})
    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"
    consumer = RoomStateConsumer(
        pool=pg_pool,
        nc=nats_client,
        js=nats_client.jetstream(),
        keyring=keyring,
        server_name=GATEWAY_NAME,
        policy_verify_key=get_verify_key(warden_identity.policy_key),
        local_user_id=OUR_USER,
        verdict_timeout_seconds=5.0,
        evaluate_subject=subject,
        caps=room_state.StateCaps(members=5, displaynames=4, policy_rules=2),
    )

    def cap_hits(kind: str) -> float:
        sample = REGISTRY.get_sample_value("warden_room_state_cap_hits_total", {"kind": kind})
        return sample or 0.0

    hits = {k: cap_hits(k) for k in ("member", "displayname", "policy_rule")}
    worker = await StandInWorker(nats_client, subject, Judge()).start()
    try:
        await add_members_and_rules(consumer, origin, rid, mod)
    finally:
        await worker.stop()
    assert len(await get_displaynames(pg_pool, rid)) == 4
    assert await pg_pool.fetchval("SELECT count(*) FROM room_members WHERE room_id = $1", rid) == 5
    assert len(await room_state.get_policy_rules(pg_pool, [rid])) == 2
    assert cap_hits("member") - hits["member"] == 2
    assert cap_hits("displayname") - hits["displayname"] == 1  # @u3: a member, no name
    assert cap_hits("policy_rule") - hits["policy_rule"] == 1


async def add_members_and_rules(
    consumer: RoomStateConsumer, origin: Any, rid: str, mod: str
) -> None:
    for i in range(6):  # the room holds mod's membership already
        user = f"@u{i}:{origin.name}"
        join = origin.event(
            rid,
            "10",
            event_type="m.room.member",
            state_key=user,
            content={"membership": "join"},
            sender=user,
        )
        assert await handled(consumer, join, rid, origin.name) == ACK
    for i in range(3):
        rule = origin.event(
            rid,
            "10",
            event_type="m.policy.rule.user",
            state_key=f"rule:{i}",
            content={"entity": f"@spam{i}:x.org", "recommendation": "m.ban"},
            sender=mod,
        )
        assert await handled(consumer, rule, rid, origin.name) == ACK


async def test_refresh_falls_back_to_the_last_verified_anchor_and_repairs_state(
    pg_pool: asyncpg.Pool,
    redis_client: Any,
    federation: Any,
    keyring: Keyring,
    https_server: Any,
) -> None:
    # An in-room server can send Warden an event it never sent to the room: it passes
    # the checks and becomes the refresh's anchor, which no trusted server knows.
    asked: list[str] = []
    snapshot: list[dict[str, Any]] = []

    async def state(request: Request) -> Response:
        event_id = request.query_params.get("event_id", "")
        asked.append(event_id)
        if event_id != "$trusted":
            return Response(b'{"errcode":"M_NOT_FOUND","error":"Unknown event"}', 404)
        return Response(orjson.dumps({"pdus": snapshot, "auth_chain": []}))

    origin = await start_origin(
        https_server, [Route("/_matrix/federation/v1/state/{room_id}", state)]
    )
    rid = (await put_room(pg_pool, new_room_id("11", origin.name), "11", "default")).room_id
    mod = f"@mod:{origin.name}"
    await room_state.seed_from_state(
        pg_pool,
        rid,
        "11",
        room_snapshot(origin, rid, "11", members={mod: 100}),
        event_id="$trusted",
    )
    made_up = origin.event(
        rid, "11", event_type="m.room.power_levels", state_key="", content={"ban": 1}, sender=mod
    )
    await room_state.apply_event(pg_pool, rid, made_up, "$made-up")
    assert (await room_state.get_power_levels(pg_pool, rid)) == {"ban": 1}
    snapshot.extend(room_snapshot(origin, rid, "11", members={mod: 100}))
    refresher = StateRefresher(
        pool=pg_pool,
        redis=redis_client,
        client=federation,
        keyring=keyring,
        trusted_origins=[origin.name],
        interval_seconds=3600,
        local_user_id=OUR_USER,
    )
    targets = {t.room_id: t for t in await room_state.rooms_to_refresh(pg_pool)}
    assert await refresher.refresh_room(targets[rid])
    assert asked == ["$made-up", "$trusted"]
    # The trusted snapshot replaced what the made-up event changed.
    assert await room_state.get_power_levels(pg_pool, rid) == {"users": {mod: 100}}
    st = await room_state.get_membership_state(pg_pool, rid)
    assert st is not None and st.last_event_id == "$trusted"

"""Verifying a state snapshot (``warden.federation.snapshot``) before it seeds learned
state: the create event binds the snapshot to the room and its version; events that do
not verify, or rest on auth events that do not, are left out. The keys are those of
the test's origin servers (what a keyring would fetch from them)."""

from __future__ import annotations

from typing import Any

import pytest
from signedjson.key import get_verify_key

from tests.gateway.policy_harness import (
    SYNAPSE_VERSIONS,
    Origin,
    add_hashes_and_signatures,
    new_room_id,
)
from tests.membership.remote_homeserver import _KnownKeys
from warden.federation.snapshot import SnapshotRejected, verified_state
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version

V11 = get_room_version("11")


def origin_named(name: str) -> Origin:
    origin = Origin()
    origin.name = name
    return origin


def keys_of(*origins: Origin) -> _KnownKeys:
    return _KnownKeys({o.name: {o.key_id: get_verify_key(o.key)} for o in origins})


def room_of(origin: Origin, room_id: str) -> list[dict[str, Any]]:
    mod = f"@mod:{origin.name}"
    return [
        origin.event(
            room_id,
            "11",
            event_type="m.room.create",
            state_key="",
            content={"room_version": "11"},
            sender=mod,
        ),
        origin.event(
            room_id,
            "11",
            event_type="m.room.member",
            state_key=mod,
            content={"membership": "join"},
            sender=mod,
        ),
    ]


async def test_the_create_event_binds_the_snapshot_to_the_room_and_version() -> None:
    real, other = origin_named("real.example"), origin_named("other.example")
    room_id = new_room_id("11", "real.example")
    keys = keys_of(real, other)
    assert len(await verified_state(keys, V11, room_id, room_of(real, room_id))) == 2
    # Another server's idea of the room: its create event is not the room's.
    with pytest.raises(SnapshotRejected):
        await verified_state(keys, V11, room_id, room_of(other, room_id))
    # Another version than the one joined with.
    with pytest.raises(SnapshotRejected):
        await verified_state(keys, get_room_version("10"), room_id, room_of(real, room_id))
    # No create event at all.
    with pytest.raises(SnapshotRejected):
        await verified_state(keys, V11, room_id, room_of(real, room_id)[1:])
    # v12: the room ID is the create event's hash.
    create12 = real.event(
        "!ignored",
        "12",
        event_type="m.room.create",
        state_key="",
        content={"room_version": "12"},
        sender="@mod:real.example",
    )
    create12.pop("room_id")
    with pytest.raises(SnapshotRejected):
        await verified_state(keys, get_room_version("12"), new_room_id("12"), [create12])


async def test_events_that_do_not_verify_are_left_out() -> None:
    real, unknown = origin_named("real.example"), origin_named("unknown.example")
    room_id = new_room_id("11", "real.example")
    keys = keys_of(real)  # unknown.example's key cannot be had
    base = room_of(real, room_id)
    good = real.event(
        room_id,
        "11",
        event_type="m.policy.rule.user",
        state_key="r1",
        content={"entity": "@s:x", "recommendation": "m.ban"},
        sender="@mod:real.example",
    )
    tampered = real.event(
        room_id,
        "11",
        event_type="m.policy.rule.user",
        state_key="r2",
        content={"entity": "@s:x", "recommendation": "m.ban"},
        sender="@mod:real.example",
    )
    tampered["content"]["entity"] = "*"
    unverifiable = unknown.event(
        room_id,
        "11",
        event_type="m.room.member",
        state_key="@u:unknown.example",
        content={"membership": "join"},
        sender="@u:unknown.example",
    )
    kept = await verified_state(keys, V11, room_id, [*base, good, tampered, unverifiable])
    assert [e.get("state_key") for e in kept] == ["", "@mod:real.example", "r1"]
    # Members on a trusted origin's word: their signatures are not checked.
    kept = await verified_state(
        keys, V11, room_id, [*base, unverifiable], check_member_signatures=False
    )
    assert len(kept) == 3


async def test_with_an_auth_chain_events_must_rest_on_verified_auth_events() -> None:
    real = origin_named("real.example")
    room_id = new_room_id("11", "real.example")
    base = room_of(real, room_id)
    create_id = compute_event_id(V11, base[0])

    def rule(key: str, auth_events: list[str]) -> dict[str, Any]:
        event = real.event(
            room_id,
            "11",
            event_type="m.policy.rule.user",
            state_key=key,
            content={"entity": "@s:x", "recommendation": "m.ban"},
            sender="@mod:real.example",
        )
        event["auth_events"] = auth_events
        event.pop("hashes")
        event.pop("signatures")
        event.pop("unsigned")
        add_hashes_and_signatures(SYNAPSE_VERSIONS["11"], event, real.name, real.key)
        return event

    grounded = rule("r1", [create_id])
    floating = rule("r2", ["$not-in-the-chain"])
    kept = await verified_state(
        keys_of(real), V11, room_id, [*base, grounded, floating], auth_chain=base
    )
    assert [e.get("state_key") for e in kept] == ["", "@mod:real.example", "r1"]

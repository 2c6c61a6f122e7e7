"""An invite never changes what Warden knows of a room (issue 10, review H4 and L5):
no re-join of a joined room, never a version change for a known room, joins through
the inviter only for rooms Warden does not know, send_join state verified before it
seeds learned state, and a bounded number of background joins. Black-box: real gateway
processes, a resident homeserver and an attacking one, both real HTTPS servers."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from signedjson.key import get_verify_key

from tests.federation.conftest import https_server  # noqa: F401
from tests.membership.conftest import GATEWAY_NAME, WARDEN_USER
from tests.membership.remote_homeserver import RemoteHomeserver, RemoteRoom
from tests.membership.test_membership_invites import q, send_invite, wait_joined
from tests.service_processes import ServiceProcess
from warden.matrix.keys import key_id_of, load_signing_key

Admin = Callable[[ServiceProcess], httpx.AsyncClient]


@pytest.fixture
async def attacker(
    https_server: Any,  # noqa: F811
    key_paths: tuple[Path, Path],
) -> RemoteHomeserver:
    """A second homeserver, not in the resident's rooms, that knows Warden's key."""
    homeserver = RemoteHomeserver()
    local = await https_server(homeserver.app(), host="127.0.0.1", names=["127.0.0.1"])
    homeserver.name = local.address
    federation_key = load_signing_key(key_paths[0])
    homeserver.trust(GATEWAY_NAME, key_id_of(federation_key), get_verify_key(federation_key))
    return homeserver


def forge_room(attacker: RemoteHomeserver, room_id: str, version: str) -> None:
    """The attacker's own idea of ``room_id``: another version, a ban-everyone rule."""
    room = RemoteRoom(room_id, version)
    attacker.rooms[room_id] = room
    content: dict[str, Any] = {"room_version": version, "creator": attacker.creator}
    attacker.new_event(room, "m.room.create", content, state_key="")
    attacker.new_event(room, "m.room.member", {"membership": "join"}, state_key=attacker.creator)
    attacker.new_event(
        room, "m.room.power_levels", {"users": {attacker.creator: 100}}, state_key=""
    )
    attacker.new_event(room, "m.room.join_rules", {"join_rule": "public"}, state_key="")
    attacker.new_event(
        room,
        "m.policy.rule.user",
        {"entity": "*", "recommendation": "m.ban", "reason": "x"},
        state_key="rule:all",
    )


async def learned(pg_pool: asyncpg.Pool, room_id: str) -> dict[str, Any]:
    version = await pg_pool.fetchval("SELECT room_version FROM rooms WHERE room_id = $1", room_id)
    members = await pg_pool.fetch(
        "SELECT user_id FROM displaynames WHERE room_id = $1 ORDER BY user_id", room_id
    )
    rules = await pg_pool.fetch(
        "SELECT state_key FROM room_state_events WHERE room_id = $1"
        " AND event_type LIKE 'm.policy.rule.%' ORDER BY state_key",
        room_id,
    )
    return {
        "version": version,
        "members": [r["user_id"] for r in members],
        "rules": [r["state_key"] for r in rules],
    }


async def test_a_forged_invite_to_a_joined_room_changes_nothing(
    remote: RemoteHomeserver,
    attacker: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    room_id = remote.create_room("10", join_rule="invite")
    resident_room = remote.rooms[room_id]
    # The resident's state carries a good rule and one whose content was changed after
    # signing (its hash no longer matches): only the first may be learned.
    remote.new_event(
        resident_room,
        "m.policy.rule.user",
        {"entity": "@spam:bad.example", "recommendation": "m.ban"},
        state_key="rule:good",
    )
    tampered = remote.new_event(
        resident_room,
        "m.policy.rule.user",
        {"entity": "@x:bad.example", "recommendation": "m.ban"},
        state_key="rule:tampered",
    )
    tampered["content"]["entity"] = "*"
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/approve_invite", json={"community_id": "default"}
    )
    assert r.status_code == 200, r.text
    r = await send_invite(admin, remote, room_id, remote.invite_event(room_id, WARDEN_USER))
    assert r.status_code == 200, r.text
    await wait_joined(pg_pool, room_id)
    before = await learned(pg_pool, room_id)
    assert before == {
        "version": "10",
        "members": sorted([remote.creator, WARDEN_USER]),
        "rules": ["rule:good"],  # the tampered one was not learned
    }

    # The attacker invites Warden to the same room, as version 10 and as version 1.
    for version in ("10", "1"):
        forge_room(attacker, room_id, version)
        r = await send_invite(admin, attacker, room_id, attacker.invite_event(room_id, WARDEN_USER))
        assert r.status_code == 403, r.text
        assert r.json()["errcode"] == "M_FORBIDDEN"
    await asyncio.sleep(2)  # what a background join would have taken
    assert not any(req.path.startswith("make_") for req in attacker.requests)
    assert await learned(pg_pool, room_id) == before

    # Asked to join through the attacker first, whose make_join names version 1: it is
    # refused before anything is sent to it; the next candidate (the room ID's server,
    # the resident) completes the join, and the recorded version stays.
    joins = len(remote.joins)
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join",
        json={"community_id": "default", "via": [attacker.name]},
    )
    assert r.status_code == 200, r.text
    assert [req.path for req in attacker.requests] == ["make_join"]
    assert attacker.joins == [] and len(remote.joins) == joins + 1
    assert await learned(pg_pool, room_id) == before
    r = await admin.get(f"/api/v1/rooms/{q(room_id)}")
    assert r.json()["room_version"] == "10"


async def test_after_a_removal_an_invite_rejoins_through_known_servers_not_the_inviter(
    remote: RemoteHomeserver,
    attacker: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    room_id = remote.create_room("10")
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/approve_invite", json={"community_id": "default"}
    )
    assert r.status_code == 200, r.text
    r = await send_invite(admin, remote, room_id, remote.invite_event(room_id, WARDEN_USER))
    assert r.status_code == 200, r.text
    await wait_joined(pg_pool, room_id)
    joins = len(remote.joins)
    # Warden was kicked (as the room-state consumer records a kick it verified).
    await pg_pool.execute(
        "UPDATE room_memberships SET membership = 'leave' WHERE room_id = $1", room_id
    )
    await pg_pool.execute(
        "UPDATE room_state SET warden_membership = 'leave', warden_removed_by = $2"
        " WHERE room_id = $1",
        room_id,
        remote.creator,
    )
    forge_room(attacker, room_id, "10")
    r = await send_invite(admin, attacker, room_id, attacker.invite_event(room_id, WARDEN_USER))
    assert r.status_code == 200, r.text
    await wait_joined(pg_pool, room_id)
    async with asyncio.timeout(30):
        while len(remote.joins) == joins:
            await asyncio.sleep(0.1)
    assert not any(req.path.startswith("make_") for req in attacker.requests)
    assert (await learned(pg_pool, room_id))["rules"] == []


async def test_background_joins_after_invites_are_bounded(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
) -> None:
    gateway = start_gateway(PS_INVITE_JOIN_MAX_PENDING="1", PS_JOIN_RETRY_BASE_SECONDS="30")
    admin = admin_client(gateway)
    remote.fail_make_join = 1000  # the first join keeps retrying
    rooms = [remote.create_room("10") for _ in range(2)]
    for room_id in rooms:
        r = await admin.post(
            f"/api/v1/rooms/{q(room_id)}/approve_invite", json={"community_id": "default"}
        )
        assert r.status_code == 200, r.text
    first = remote.invite_event(rooms[0], WARDEN_USER)
    r = await send_invite(admin, remote, rooms[0], first)
    assert r.status_code == 200, r.text
    # The same room again: the pending join is reused, not a second one.
    r = await send_invite(admin, remote, rooms[0], copy.deepcopy(first))
    assert r.status_code == 200, r.text
    r = await send_invite(admin, remote, rooms[1], remote.invite_event(rooms[1], WARDEN_USER))
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] and r.json()["errcode"] == "M_UNKNOWN"
    metrics = httpx.get(f"{gateway.metrics_url}/metrics").text
    assert 'warden_background_joins_total{outcome="refused"} 1.0' in metrics
    assert 'warden_background_joins_total{outcome="already_pending"} 1.0' in metrics
    assert "warden_background_joins_pending 1.0" in metrics

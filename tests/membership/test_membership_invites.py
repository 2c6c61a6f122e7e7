"""Invites of Warden's user over federation (v2 and v1): refused unless an operator
approved the room, counter-signed with the federation key when accepted, and followed
by a join through the inviting server."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from signedjson.key import get_verify_key

from tests.membership.conftest import GATEWAY_NAME, WARDEN_USER
from tests.membership.remote_homeserver import RemoteHomeserver
from tests.service_processes import ServiceProcess
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.event_signing import verify_event_signature
from warden.matrix.keys import key_id_of, load_signing_key
from warden.matrix.room_versions import get_room_version

Admin = Callable[[ServiceProcess], httpx.AsyncClient]


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


async def send_invite(
    client: httpx.AsyncClient,
    remote: RemoteHomeserver,
    room_id: str,
    event: dict[str, Any],
    *,
    api: str = "v2",
    event_id: str | None = None,
) -> httpx.Response:
    """PUT the invite to the gateway as the remote would, with X-Matrix."""
    version = remote.rooms[room_id].version
    event_id = event_id or compute_event_id(get_room_version(version), event)
    uri = f"/_matrix/federation/{api}/invite/{q(room_id)}/{q(event_id)}"
    body: Any = (
        {"room_version": version, "event": event, "invite_room_state": []} if api == "v2" else event
    )
    headers = {
        "Authorization": remote.auth_header(GATEWAY_NAME, "PUT", uri, body),
        "Content-Type": "application/json",
    }
    return await client.put(uri, content=orjson.dumps(body), headers=headers)


async def wait_joined(pg_pool: asyncpg.Pool, room_id: str) -> str:
    """The community the room was joined into, once the background join is done."""
    async with asyncio.timeout(30):
        while True:
            row = await pg_pool.fetchrow(
                "SELECT r.community_id FROM rooms r JOIN room_memberships m USING (room_id)"
                " WHERE room_id = $1 AND m.membership = 'join'",
                room_id,
            )
            if row is not None:
                return str(row["community_id"])
            await asyncio.sleep(0.1)


async def test_invite_refused_until_approved_then_countersigned_and_joined(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
    key_paths: tuple[Path, Path],
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    room_id = remote.create_room("12", join_rule="invite")
    invite = remote.invite_event(room_id, WARDEN_USER)

    r = await send_invite(admin, remote, room_id, invite)
    assert r.status_code == 403, r.text
    assert r.json()["errcode"] == "M_FORBIDDEN"

    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/approve_invite", json={"community_id": "nope"}
    )
    assert r.status_code == 400 and r.json()["errcode"] == "M_BAD_JSON", r.text
    r = await admin.post("/api/v1/communities/new", json={"name": "Invited community"})
    community = r.json()["community_id"]
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/approve_invite", json={"community_id": community}
    )
    assert r.status_code == 200, r.text
    assert r.json()["room_id"] == room_id and r.json()["community_id"] == community
    r = await admin.get(f"/api/v1/rooms/{q(room_id)}/approve_invite")
    assert r.status_code == 200 and r.json()["community_id"] == community

    r = await send_invite(admin, remote, room_id, invite)
    assert r.status_code == 200, r.text
    signed = r.json()["event"]
    # The same event, with the remote's signature kept and Warden's federation key's added.
    federation_key = load_signing_key(key_paths[0])
    version = get_room_version("12")
    assert compute_event_id(version, signed) == compute_event_id(version, invite)
    assert signed["signatures"][remote.name] == invite["signatures"][remote.name]
    assert verify_event_signature(
        version, signed, GATEWAY_NAME, key_id_of(federation_key), get_verify_key(federation_key)
    )
    policy_key = load_signing_key(key_paths[1])
    assert not verify_event_signature(
        version, signed, GATEWAY_NAME, key_id_of(federation_key), get_verify_key(policy_key)
    )

    # Then Warden joins through the inviting server, into the approved community.
    assert await wait_joined(pg_pool, room_id) == community
    assert remote.joins and remote.joins[-1].event is not None
    assert remote.joins[-1].event["state_key"] == WARDEN_USER

    # Withdrawn approval: refused again.
    r = await admin.delete(f"/api/v1/rooms/{q(room_id)}/approve_invite")
    assert r.status_code == 200, r.text
    r = await send_invite(admin, remote, room_id, remote.invite_event(room_id, WARDEN_USER))
    assert r.status_code == 403, r.text


async def test_invite_allow_list_v1_and_self_join_communities(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
) -> None:
    # Room IDs must be known before the gateway starts (PS_INVITE_ALLOWED_ROOM_IDS).
    allowed_v1 = remote.create_room("1", join_rule="invite")
    gateway = start_gateway(PS_INVITE_ALLOWED_ROOM_IDS=f"!other:example.org,{allowed_v1}")
    admin = admin_client(gateway)

    # v1 invite (room version 1): the answer is [200, {"event": ...}].
    r = await send_invite(
        admin, remote, allowed_v1, remote.invite_event(allowed_v1, WARDEN_USER), api="v1"
    )
    assert r.status_code == 200, r.text
    status, answer = r.json()
    assert status == 200 and GATEWAY_NAME in answer["event"]["signatures"]
    assert await wait_joined(pg_pool, allowed_v1) == "default"

    # A room already protected for a community that may self-join: a re-invite (after
    # a kick, say) is accepted into that community.
    r = await admin.post("/api/v1/communities/new", json={"name": "Self joiners"})
    community = r.json()["community_id"]
    r = await admin.patch(f"/api/v1/communities/{community}", json={"can_self_join_rooms": True})
    assert r.status_code == 200, r.text
    kicked = remote.create_room("11", join_rule="invite")
    r = await admin.put(
        f"/api/v1/rooms/{q(kicked)}", json={"room_version": "11", "community_id": community}
    )
    assert r.status_code == 200, r.text
    r = await send_invite(admin, remote, kicked, remote.invite_event(kicked, WARDEN_USER))
    assert r.status_code == 200, r.text
    assert await wait_joined(pg_pool, kicked) == community

    # The same without can_self_join_rooms: refused.
    other = remote.create_room("11", join_rule="invite")
    r = await admin.put(
        f"/api/v1/rooms/{q(other)}", json={"room_version": "11", "community_id": "default"}
    )
    assert r.status_code == 200, r.text
    r = await send_invite(admin, remote, other, remote.invite_event(other, WARDEN_USER))
    assert r.status_code == 403, r.text


async def test_invalid_invites_are_refused(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
) -> None:
    room_id = remote.create_room("10", join_rule="invite")
    gateway = start_gateway(PS_INVITE_ALLOWED_ROOM_IDS=room_id)
    admin = admin_client(gateway)

    # Someone else's invite.
    r = await send_invite(admin, remote, room_id, remote.invite_event(room_id, "@bob:warden.test"))
    assert r.status_code == 403 and r.json()["errcode"] == "M_FORBIDDEN", r.text

    # The path's event ID is not the event's.
    invite = remote.invite_event(room_id, WARDEN_USER)
    r = await send_invite(admin, remote, room_id, invite, event_id="$nope")
    assert r.status_code == 400 and r.json()["errcode"] == "M_INVALID_PARAM", r.text

    # Content changed after signing: the hash no longer matches.
    tampered = {**invite, "content": {"membership": "invite", "reason": "changed"}}
    r = await send_invite(admin, remote, room_id, tampered)
    assert r.status_code == 400 and r.json()["errcode"] == "M_BAD_JSON", r.text

    # A bad signature by the sending server.
    forged = orjson.loads(orjson.dumps(invite))
    sig = forged["signatures"][remote.name][remote.key_id]
    forged["signatures"][remote.name][remote.key_id] = ("A" if sig[0] != "A" else "B") + sig[1:]
    r = await send_invite(admin, remote, room_id, forged)
    assert r.status_code == 403 and r.json()["errcode"] == "M_FORBIDDEN", r.text

    # No X-Matrix at all.
    uri = f"/_matrix/federation/v2/invite/{q(room_id)}/{q('$x')}"
    r = await admin.put(uri, json={"room_version": "10", "event": invite})
    assert r.status_code == 401 and r.json()["errcode"] == "M_UNAUTHORIZED", r.text

    # An unknown room version.
    body = {"room_version": "99", "event": invite, "invite_room_state": []}
    event_id = compute_event_id(get_room_version("10"), invite)
    uri = f"/_matrix/federation/v2/invite/{q(room_id)}/{q(event_id)}"
    headers = {"Authorization": remote.auth_header(GATEWAY_NAME, "PUT", uri, body)}
    r = await admin.put(uri, json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["errcode"] == "M_INCOMPATIBLE_ROOM_VERSION"

    # Not JSON (from an origin whose key is known: without X-Matrix it is 401 before the
    # body is read).
    r = await admin.put(
        uri, content=b"{nope", headers={**headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["errcode"] == "M_NOT_JSON", r.text

    # The valid invite is still accepted afterwards.
    r = await send_invite(admin, remote, room_id, invite)
    assert r.status_code == 200, r.text

    metrics = httpx.get(f"{gateway.metrics_url}/metrics").text
    assert 'warden_invites_total{outcome="accepted"} 1.0' in metrics
    assert 'warden_invites_total{outcome="refused"}' in metrics
    assert 'warden_invites_total{outcome="invalid"}' in metrics

"""Joining and leaving rooms through the admin API, against a resident homeserver on
HTTPS, with gateway processes on the real PostgreSQL, Redis and NATS."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import orjson
from nats.aio.client import Client as NATS

from tests.membership.conftest import GATEWAY_NAME, WARDEN_USER
from tests.membership.remote_homeserver import RemoteHomeserver
from tests.service_processes import ServiceProcess
from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.matrix.keys import load_signing_key, verify_key_base64

Admin = Callable[[ServiceProcess], httpx.AsyncClient]


def q(room_id: str) -> str:
    return urllib.parse.quote(room_id, safe="")


async def new_community(admin: httpx.AsyncClient, name: str) -> str:
    r = await admin.post("/api/v1/communities/new", json={"name": name})
    assert r.status_code == 200, r.text
    return str(r.json()["community_id"])


async def test_join_rooms_of_each_event_format_v2_and_v1_fallback(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
    key_paths: tuple[Path, Path],
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    cases = [("1", True), ("3", True), ("10", True), ("12", True), ("10", False), ("12", False)]
    for version, v2 in cases:
        remote.v2_enabled = v2
        room_id = remote.create_room(version)
        r = await admin.post(
            f"/api/v1/rooms/{q(room_id)}/join",
            json={"community_id": "default", "via": [remote.name]},
        )
        assert r.status_code == 200, (version, v2, r.text)
        body = r.json()
        assert body["room_id"] == room_id
        assert body["room_version"] == version
        assert body["community_id"] == "default"

        # The resident server accepted the event: Synapse computed the same event ID,
        # the content hash and Warden's federation signature verified.
        join = remote.joins[-1]
        assert join.path == ("v2/send_join" if v2 else "v1/send_join")
        assert join.event is not None
        assert join.event["sender"] == WARDEN_USER
        assert join.event["state_key"] == WARDEN_USER
        assert join.event["content"]["membership"] == "join"
        if int(version) <= 10:
            assert join.event["origin"] == GATEWAY_NAME
        else:
            assert "origin" not in join.event
        if version == "12":
            assert join.event["room_id"] == room_id

        room = await pg_pool.fetchrow(
            "SELECT room_version, community_id FROM rooms WHERE room_id = $1", room_id
        )
        assert room is not None and tuple(room) == (version, "default")
        member = await pg_pool.fetchrow(
            "SELECT membership, servers FROM room_memberships WHERE room_id = $1", room_id
        )
        assert member is not None
        assert member["membership"] == "join"
        assert member["servers"][0] == remote.name
        # The send_join state seeded the learned members (the creator, and Warden).
        members = {
            row["user_id"]
            for row in await pg_pool.fetch(
                "SELECT user_id FROM displaynames WHERE room_id = $1", room_id
            )
        }
        assert remote.creator in members, (version, members)
        assert body["policy_server"]["uses_warden"] is False

    # A room that already names Warden (with its policy key) in m.room.policy: the join's
    # state says so at once.
    policy_key = verify_key_base64(load_signing_key(key_paths[1]))
    room_id = remote.create_room("12")
    remote.new_event(
        remote.rooms[room_id],
        "m.room.policy",
        {"via": GATEWAY_NAME, "public_keys": {"ed25519": policy_key}},
        state_key="",
    )
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join", json={"community_id": "default", "via": [remote.name]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["policy_server"] == {
        "uses_warden": True,
        "via": GATEWAY_NAME,
        "public_key": policy_key,
        "key_matches": True,
    }
    metrics = httpx.get(f"{gateway.metrics_url}/metrics").text
    assert 'warden_federation_joins_total{outcome="joined"} 7.0' in metrics


async def test_join_failures_are_clear_errors(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    room_id = remote.create_room("11")

    # Unknown community: nothing is asked of any server.
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join", json={"community_id": "nope", "via": [remote.name]}
    )
    assert r.status_code == 400 and r.json()["errcode"] == "M_BAD_JSON", r.text
    assert "community_id" in r.json()["error"]
    assert not remote.requests

    # A bad room ID and a bad server name.
    r = await admin.post("/api/v1/rooms/not-a-room/join", json={"community_id": "default"})
    assert r.status_code == 400 and r.json()["errcode"] == "M_INVALID_PARAM", r.text
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join", json={"community_id": "default", "via": ["a b"]}
    )
    assert r.status_code == 400 and r.json()["errcode"] == "M_BAD_JSON", r.text

    # The resident server refuses: 502 naming the server and its answer.
    remote.make_join_error = (403, "M_FORBIDDEN", "You are not invited to this room")
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join",
        json={"community_id": "default", "via": [remote.name]},
    )
    assert r.status_code == 502, r.text
    body = r.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert "You are not invited" in body["reasons"][remote.name]
    assert "M_FORBIDDEN" in body["error"]
    assert await pg_pool.fetchval("SELECT 1 FROM rooms WHERE room_id = $1", room_id) is None

    # Nothing answers: every failure is temporary, 503 with the reason per server.
    remote.make_join_error = None
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join",
        json={"community_id": "default", "via": ["127.0.0.1:1"]},
    )
    # The room ID names the remote too, so it is tried after the dead server and works.
    assert r.status_code == 200, r.text
    dead_only = f"!{'x' * 10}:127.0.0.1:1"
    r = await admin.post(
        f"/api/v1/rooms/{q(dead_only)}/join",
        json={"community_id": "default", "via": ["127.0.0.1:1"]},
    )
    assert r.status_code == 503, r.text
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert "127.0.0.1:1" in r.json()["reasons"]

    # A room version Warden does not know.
    room_v13 = remote.create_room("10")
    remote.rooms[room_v13].version = "org.example.custom"
    r = await admin.post(
        f"/api/v1/rooms/{q(room_v13)}/join",
        json={"community_id": "default", "via": [remote.name]},
    )
    assert r.status_code == 400, r.text
    assert r.json()["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"
    # The room's real version (from the error's room_version), not the error text.
    assert "org.example.custom" in r.json()["error"]
    assert "does not support the features" not in r.json()["error"]


async def test_rejoin_and_move_between_communities(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    first = await new_community(admin, "First community")
    second = await new_community(admin, "Second community")
    room_id = remote.create_room("12")
    path = f"/api/v1/rooms/{q(room_id)}/join"

    r = await admin.post(path, json={"community_id": first, "via": [remote.name]})
    assert r.status_code == 200, r.text
    # Kicked: the resident server now says Warden left; joining again works (policyserv
    # refuses a known room).
    room = remote.rooms[room_id]
    remote.new_event(room, "m.room.member", {"membership": "leave"}, state_key=WARDEN_USER)
    r = await admin.post(path, json={"community_id": second, "via": [remote.name]})
    assert r.status_code == 200, r.text
    assert r.json()["community_id"] == second
    assert len(remote.joins) == 2
    assert remote.joins[0].event != remote.joins[1].event
    assert (
        await pg_pool.fetchval("SELECT community_id FROM rooms WHERE room_id = $1", room_id)
        == second
    )
    r = await admin.get(f"/api/v1/rooms/{q(room_id)}")
    assert r.status_code == 200 and r.json()["community_id"] == second

    # Moving without joining again still works through PUT.
    r = await admin.put(
        f"/api/v1/rooms/{q(room_id)}", json={"room_version": "12", "community_id": first}
    )
    assert r.status_code == 200 and r.json()["community_id"] == first


async def test_leave_stops_protection(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    admin_client: Admin,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
) -> None:
    gateway = start_gateway()
    admin = admin_client(gateway)
    room_id = remote.create_room("10")
    r = await admin.post(
        f"/api/v1/rooms/{q(room_id)}/join", json={"community_id": "default", "via": [remote.name]}
    )
    assert r.status_code == 200, r.text

    async def ask_to_sign() -> httpx.Response:
        event = remote.new_event(
            remote.rooms[room_id],
            "m.room.message",
            {"msgtype": "m.text", "body": "hi"},
            append=False,
        )
        uri = "/_matrix/policy/v1/sign"
        headers = {
            "Authorization": remote.auth_header(GATEWAY_NAME, "POST", uri, event),
            "Content-Type": "application/json",
        }
        return await admin.post(uri, content=orjson.dumps(event), headers=headers)

    before = await ask_to_sign()
    # Protected: the request got past the room lookup (answered by a worker or 503).
    assert before.status_code != 404, before.text

    changes: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_change(msg: object) -> None:
        changes.put_nowait(msg.data)  # type: ignore[attr-defined]

    sub = await nats_client.subscribe(CONFIG_CHANGED_SUBJECT, cb=on_change)
    await nats_client.flush()
    try:
        r = await admin.post(f"/api/v1/rooms/{q(room_id)}/leave", json={})
        assert r.status_code == 200, r.text
        assert r.json() == {}
        async with asyncio.timeout(10):
            while orjson.loads(await changes.get()) != {"room_id": room_id}:
                pass
    finally:
        await sub.unsubscribe()

    leave = remote.leaves[-1]
    assert leave.path == "v2/send_leave"
    assert leave.event is not None and leave.event["content"]["membership"] == "leave"
    assert await pg_pool.fetchval("SELECT 1 FROM rooms WHERE room_id = $1", room_id) is None
    assert (
        await pg_pool.fetchval(
            "SELECT membership FROM room_memberships WHERE room_id = $1", room_id
        )
        == "leave"
    )
    after = await ask_to_sign()
    assert after.status_code == 404, after.text
    assert after.json()["errcode"] == "M_NOT_FOUND"

    # Leaving again: the room is unknown to Warden as a protected room but it remembers
    # the membership; the resident server's v1 endpoint works as a fallback.
    remote.v2_enabled = False
    r = await admin.post(f"/api/v1/rooms/{q(room_id)}/leave")
    assert r.status_code == 200, r.text
    assert remote.leaves[-1].path == "v1/send_leave"

    r = await admin.post(f"/api/v1/rooms/{q('!unknown:example.org')}/leave")
    assert r.status_code == 404 and r.json()["errcode"] == "M_NOT_FOUND"


async def test_startup_rooms_joined_with_retries_by_one_replica(
    remote: RemoteHomeserver,
    start_gateway: Callable[..., ServiceProcess],
    pg_pool: asyncpg.Pool,
    redis_client: object,  # flushes the test Redis: no stale start-up lock
) -> None:
    room_id = remote.create_room("12")
    remote.fail_make_join = 2
    env = {"PS_JOIN_ROOM_IDS": room_id, "PS_JOIN_SERVER": remote.name}
    gateways = [start_gateway(**env), start_gateway(**env)]

    async with asyncio.timeout(60):
        while not await pg_pool.fetchval(
            "SELECT 1 FROM room_memberships WHERE room_id = $1 AND membership = 'join'", room_id
        ):
            await asyncio.sleep(0.1)
    assert (
        await pg_pool.fetchval("SELECT community_id FROM rooms WHERE room_id = $1", room_id)
        == "default"
    )
    # Two failures, then one success: one replica did the work.
    make_joins = [r for r in remote.requests if r.path == "make_join"]
    assert len(make_joins) == 3
    assert len(remote.joins) == 1

    async with asyncio.timeout(30):
        while not all("start-up rooms joined" in g.output() for g in gateways):
            await asyncio.sleep(0.1)
    outputs = [g.output() for g in gateways]
    assert sum("joining start-up rooms" in out for out in outputs) == 1, outputs
    assert sum("start-up join failed; will retry" in out for out in outputs) == 1
    for gateway in gateways:
        assert gateway.proc.poll() is None  # failures never stopped a gateway

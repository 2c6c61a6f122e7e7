"""Protected rooms: list, get, protect, move, unprotect, set the moderator."""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.admin_api.admin_api_helpers import ConfigChanges, assert_matrix_error
from warden.matrix.event_hashes import room_id_from_create_event
from warden.matrix.room_versions import get_room_version


def v11_room_id() -> str:
    return f"!{secrets.token_hex(8)}:example.org"


def v12_room_id() -> str:
    """A real room version 12 room ID: derived from a create event (MSC4291)."""
    create = {
        "type": "m.room.create",
        "state_key": "",
        "sender": "@creator:example.org",
        "content": {"room_version": "12", "nonce": secrets.token_hex(8)},
        "origin_server_ts": 1_700_000_000_000,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    return str(room_id_from_create_event(create, get_room_version("12")))


def encoded(room_id: str) -> str:
    """The room ID percent-encoded, ``!`` and ``:`` included."""
    return quote(room_id, safe="")


async def protect(
    admin: httpx.AsyncClient, room_id: str, version: str = "11", community: str = "default"
) -> httpx.Response:
    return await admin.put(
        f"/api/v1/rooms/{room_id}", json={"room_version": version, "community_id": community}
    )


async def test_no_rooms_is_an_empty_list_not_null(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/api/v1/rooms")
    assert r.status_code == 200
    assert r.content == b"[]"


async def test_protect_a_room_then_read_it_back_raw_and_encoded(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, config_changes: ConfigChanges
) -> None:
    room_id = v11_room_id()
    r = await protect(admin, room_id)
    assert r.status_code == 200, r.text
    expected = {
        "room_id": room_id,
        "room_version": "11",
        "moderator_user_id": "",
        "last_cached_state_timestamp": 0,
        "community_id": "default",
    }
    assert r.json() == expected
    await config_changes.expect({"room_id": room_id})
    assert await admin_pool.fetchval("SELECT community_id FROM rooms WHERE room_id = $1", room_id)

    for path in (room_id, encoded(room_id)):
        r = await admin.get(f"/api/v1/rooms/{path}")
        assert r.status_code == 200, (path, r.text)
        # One room's record also says what its learned m.room.policy says (nothing yet).
        assert r.json() == {
            **expected,
            "policy_server": {
                "uses_warden": False,
                "via": None,
                "public_key": None,
                "key_matches": False,
            },
        }
    r = await admin.get("/api/v1/rooms")
    assert r.json() == [expected]


async def test_protect_with_an_encoded_path_and_a_v12_room(
    admin: httpx.AsyncClient, config_changes: ConfigChanges
) -> None:
    room_id = v12_room_id()
    assert ":" not in room_id and len(room_id) == 44
    r = await protect(admin, encoded(room_id), version="12")
    assert r.status_code == 200, r.text
    assert r.json()["room_id"] == room_id
    await config_changes.expect({"room_id": room_id})
    other = v11_room_id()
    r = await protect(admin, encoded(other), version="1")
    assert r.status_code == 200, r.text
    r = await admin.get("/api/v1/rooms")
    assert [room["room_id"] for room in r.json()] == sorted([room_id, other])


async def test_moving_a_room_keeps_its_moderator(
    admin: httpx.AsyncClient, config_changes: ConfigChanges
) -> None:
    room_id = v11_room_id()
    await protect(admin, room_id)
    r = await admin.post(
        "/api/v1/set_room_moderator",
        json={"room_id": room_id, "moderator_user_id": "@mod:example.org"},
    )
    assert r.status_code == 200, r.text
    r = await admin.post("/api/v1/communities/new", json={"name": "Elsewhere"})
    community = r.json()["community_id"]
    config_changes.drain()

    r = await protect(admin, room_id, version="10", community=community)
    assert r.status_code == 200, r.text
    assert r.json()["community_id"] == community
    assert r.json()["room_version"] == "10"
    assert r.json()["moderator_user_id"] == "@mod:example.org"
    await config_changes.expect({"room_id": room_id})
    r = await admin.get(f"/api/v1/rooms/{room_id}")
    assert r.json()["community_id"] == community


@pytest.mark.parametrize(
    ("room_id", "version"),
    [
        ("!abc", "11"),  # no server part before v12
        ("!:example.org", "11"),  # empty opaque part
        ("abc:example.org", "11"),  # no sigil
        ("$abc:example.org", "11"),  # an event ID
        ("!abc:bad_server!", "11"),  # not a server name
        ("!abc:example.org", "12"),  # v12 room IDs have no server part
        ("!" + "A" * 42, "12"),  # too short for a hash
        ("!" + "A" * 43 + "=", "12"),  # padded
        ("!" + "a" * 300 + ":example.org", "11"),  # longer than 255 bytes
    ],
)
async def test_malformed_room_ids_are_refused(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, room_id: str, version: str
) -> None:
    r = await protect(admin, encoded(room_id), version=version)
    assert assert_matrix_error(r, 400, "M_INVALID_PARAM").startswith("room_id:")
    assert await admin_pool.fetchval("SELECT count(*) FROM rooms") == 0


async def test_a_v12_hash_is_accepted_for_v12_only(admin: httpx.AsyncClient) -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"x").digest()).rstrip(b"=").decode()
    r = await protect(admin, "!" + digest, version="12")
    assert r.status_code == 200, r.text
    r = await protect(admin, "!" + digest, version="11")
    assert_matrix_error(r, 400, "M_INVALID_PARAM")


@pytest.mark.parametrize("version", ["99", "", "org.example.custom", "1.0"])
async def test_unsupported_room_versions_are_refused(
    admin: httpx.AsyncClient, version: str
) -> None:
    r = await protect(admin, v11_room_id(), version=version)
    assert_matrix_error(r, 400, "M_UNSUPPORTED_ROOM_VERSION")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"room_version": 11, "community_id": "default"}, "room_version"),
        ({"community_id": "default"}, "room_version"),
        ({"room_version": "11"}, "community_id"),
        ({"room_version": "11", "community_id": None}, "community_id"),
        ({"room_version": "11", "community_id": "no-such-community"}, "community_id"),
    ],
)
async def test_invalid_protect_bodies_name_the_field(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, body: dict[str, object], field: str
) -> None:
    r = await admin.put(f"/api/v1/rooms/{v11_room_id()}", json=body)
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith(f"{field}:")
    assert await admin_pool.fetchval("SELECT count(*) FROM rooms") == 0


async def test_unprotect(admin: httpx.AsyncClient, config_changes: ConfigChanges) -> None:
    room_id = v11_room_id()
    await protect(admin, room_id)
    config_changes.drain()
    r = await admin.delete(f"/api/v1/rooms/{encoded(room_id)}")
    assert r.status_code == 200
    assert r.json() == {}
    await config_changes.expect({"room_id": room_id})
    assert_matrix_error(await admin.get(f"/api/v1/rooms/{room_id}"), 404, "M_NOT_FOUND")
    assert_matrix_error(await admin.delete(f"/api/v1/rooms/{room_id}"), 404, "M_NOT_FOUND")
    assert (await admin.get("/api/v1/rooms")).json() == []


async def test_unknown_room_is_404(admin: httpx.AsyncClient) -> None:
    r = await admin.get(f"/api/v1/rooms/{encoded(v11_room_id())}")
    assert_matrix_error(r, 404, "M_NOT_FOUND")


async def test_set_room_moderator_echoes_stores_and_unsets(
    admin: httpx.AsyncClient, config_changes: ConfigChanges
) -> None:
    room_id = v11_room_id()
    await protect(admin, room_id)
    body = {"room_id": room_id, "moderator_user_id": "@mod:example.org"}
    r = await admin.post("/api/v1/set_room_moderator", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == body
    await config_changes.expect({"room_id": room_id})
    assert (await admin.get(f"/api/v1/rooms/{room_id}")).json()["moderator_user_id"] == (
        "@mod:example.org"
    )
    body = {"room_id": room_id, "moderator_user_id": ""}
    r = await admin.post("/api/v1/set_room_moderator", json=body)
    assert r.json() == body
    assert (await admin.get(f"/api/v1/rooms/{room_id}")).json()["moderator_user_id"] == ""


async def test_set_room_moderator_errors(admin: httpx.AsyncClient) -> None:
    room_id = v11_room_id()
    r = await admin.post(
        "/api/v1/set_room_moderator",
        json={"room_id": room_id, "moderator_user_id": "@mod:example.org"},
    )
    assert_matrix_error(r, 404, "M_NOT_FOUND")
    await protect(admin, room_id)
    for bad in ("mod", "@mod", "@:example.org", "@mod:bad_server!", 5, None):
        r = await admin.post(
            "/api/v1/set_room_moderator", json={"room_id": room_id, "moderator_user_id": bad}
        )
        message = assert_matrix_error(r, 400, "M_BAD_JSON")
        assert message.startswith("moderator_user_id:"), message
    r = await admin.post("/api/v1/set_room_moderator", json={"moderator_user_id": ""})
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith("room_id:")

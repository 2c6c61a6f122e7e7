"""Community access tokens (rotation, hash-only storage) and community deletion."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY
from starlette.requests import Request

from tests.admin_api.admin_api_helpers import ConfigChanges, assert_matrix_error
from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.matrix.errors import UnknownToken
from warden.storage import community_tokens
from warden.storage.community_tokens import community_by_access_token
from warden_gateway.community_auth import CommunityAuth


async def new_community(admin: httpx.AsyncClient, name: str = "Token community") -> str:
    r = await admin.post("/api/v1/communities/new", json={"name": name})
    assert r.status_code == 200, r.text
    return str(r.json()["community_id"])


async def rotate(admin: httpx.AsyncClient, community_id: str) -> dict[str, Any]:
    r = await admin.post(f"/api/v1/communities/{community_id}/rotate_access_token")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_rotation_shows_the_token_once_and_stores_only_its_hash(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    community_id = await new_community(admin)
    assert await community_by_access_token(admin_pool, "pst_anything") is None

    first = await rotate(admin, community_id)
    token = first["new_access_token"]
    assert first["old_access_token"] == "" and first["had_access_token"] is False
    assert token.startswith("pst_") and len(token) >= 4 + 43  # 256 bits, base64

    # The database holds the hash, never the token.
    row = await admin_pool.fetchrow("SELECT * FROM communities WHERE id = $1", community_id)
    assert row is not None
    assert row["api_access_token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert all(token not in str(value) for value in row.values())
    # Nor does any read of the community show it.
    r = await admin.get(f"/api/v1/communities/{community_id}")
    assert token not in r.text and "access_token" not in r.text

    found = await community_by_access_token(admin_pool, token)
    assert found is not None and found.community_id == community_id

    # Rotating again: the old token is dead at once, the new one works.
    second = await rotate(admin, community_id)
    assert second["had_access_token"] is True and second["old_access_token"] == ""
    assert second["new_access_token"] != token
    assert await community_by_access_token(admin_pool, token) is None
    found = await community_by_access_token(admin_pool, second["new_access_token"])
    assert found is not None and found.community_id == community_id

    # Each rotation is logged by community, without the token.
    assert caplog.text.count("community access token rotated") == 2
    assert token not in caplog.text and second["new_access_token"] not in caplog.text

    assert_matrix_error(
        await admin.post("/api/v1/communities/nope/rotate_access_token"), 404, "M_NOT_FOUND"
    )


async def test_tokens_are_unique_and_random(admin: httpx.AsyncClient) -> None:
    community_id = await new_community(admin)
    tokens = {(await rotate(admin, community_id))["new_access_token"] for _ in range(5)}
    assert len(tokens) == 5


async def test_the_lookup_compares_hashes_in_constant_time(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    community_id = await new_community(admin)
    token = (await rotate(admin, community_id))["new_access_token"]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(community_tokens.hmac, "compare_digest", spy)
    assert await community_by_access_token(admin_pool, token) is not None
    digest = hashlib.sha256(token.encode()).hexdigest().encode()
    assert calls == [(digest, digest)]
    # Malformed tokens are refused without a lookup.
    assert await community_by_access_token(admin_pool, "") is None
    assert await community_by_access_token(admin_pool, "pst_" + "a" * 300) is None


async def test_delete_community_without_rooms(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, config_changes: ConfigChanges
) -> None:
    community_id = await new_community(admin)
    token = (await rotate(admin, community_id))["new_access_token"]
    r = await admin.post(
        f"/api/v1/rooms/{'!a:example.org'}/approve_invite", json={"community_id": community_id}
    )
    assert r.status_code == 200, r.text

    r = await admin.delete(f"/api/v1/communities/{community_id}")
    assert r.status_code == 200, r.text
    assert r.json() == {"moved_room_ids": []}
    await config_changes.expect({"community_id": community_id})
    assert_matrix_error(await admin.get(f"/api/v1/communities/{community_id}"), 404, "M_NOT_FOUND")
    # Its token and invite approvals went with it.
    assert await community_by_access_token(admin_pool, token) is None
    assert await admin_pool.fetchval("SELECT count(*) FROM invite_approvals") == 0
    assert_matrix_error(
        await admin.delete(f"/api/v1/communities/{community_id}"), 404, "M_NOT_FOUND"
    )
    r = await admin.get("/api/v1/rooms")
    assert r.status_code == 200 and r.json() == []


async def test_delete_community_with_rooms_is_refused_unless_they_move(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    doomed = await new_community(admin, "Doomed")
    heir = await new_community(admin, "Heir")
    for room_id in ("!b:example.org", "!a:example.org"):
        r = await admin.put(
            f"/api/v1/rooms/{room_id}", json={"room_version": "10", "community_id": doomed}
        )
        assert r.status_code == 200, r.text

    message = assert_matrix_error(
        await admin.delete(f"/api/v1/communities/{doomed}"), 400, "M_BAD_STATE"
    )
    assert "2 room" in message
    assert (await admin.get(f"/api/v1/communities/{doomed}")).status_code == 200

    # A move to an unknown community, or to itself, changes nothing.
    for target in ("nope", doomed):
        assert_matrix_error(
            await admin.delete(f"/api/v1/communities/{doomed}", params={"move_rooms_to": target}),
            400,
            "M_INVALID_PARAM",
        )
    assert (
        await admin_pool.fetchval("SELECT count(*) FROM rooms WHERE community_id = $1", doomed) == 2
    )

    r = await admin.delete(f"/api/v1/communities/{doomed}", params={"move_rooms_to": heir})
    assert r.status_code == 200, r.text
    assert r.json() == {"moved_room_ids": ["!a:example.org", "!b:example.org"]}
    rooms = (await admin.get("/api/v1/rooms")).json()
    assert {(room["room_id"], room["community_id"]) for room in rooms} == {
        ("!a:example.org", heir),
        ("!b:example.org", heir),
    }
    assert_matrix_error(await admin.get(f"/api/v1/communities/{doomed}"), 404, "M_NOT_FOUND")


async def test_the_default_community_cannot_be_deleted(admin: httpx.AsyncClient) -> None:
    assert_matrix_error(await admin.delete("/api/v1/communities/default"), 400, "M_BAD_STATE")
    assert (await admin.get("/api/v1/communities/default")).status_code == 200


async def test_gateways_keep_found_tokens_and_forget_them_on_rotation(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    """Two gateway replicas keep a token they found (no PostgreSQL lookup per request);
    a rotation through the admin API reaches both over NATS, so the old token is refused
    at once on each, long before the cache period ends. Unknown tokens are not kept."""
    community_id = await new_community(admin)
    token = (await rotate(admin, community_id))["new_access_token"]
    replicas = [
        CommunityAuth(admin_pool, rate_limiter=None, failures_per_minute=100, cache_seconds=300)
        for _ in range(2)
    ]
    subs = [
        await nats_client.subscribe(CONFIG_CHANGED_SUBJECT, cb=r.on_config_changed)
        for r in replicas
    ]
    await nats_client.flush()

    def request(value: str) -> Request:
        headers = [(b"authorization", f"Bearer {value}".encode())]
        return Request({"type": "http", "headers": headers, "client": ("10.0.0.1", 1)})

    def lookups(source: str) -> float:
        value = REGISTRY.get_sample_value(
            "warden_community_token_lookups_total", {"source": source}
        )
        return value or 0.0

    try:
        for replica in replicas:
            found = await replica.authenticate(request(token))
            assert found.community_id == community_id
        db_before, cache_before = lookups("database"), lookups("cache")
        for replica in replicas:
            for _ in range(5):
                assert (await replica.authenticate(request(token))).community_id == community_id
        assert lookups("database") == db_before  # every one from memory
        assert lookups("cache") == cache_before + 10

        # Unknown tokens are refused and never kept (an outsider cannot grow the cache).
        for i in range(20):
            with pytest.raises(UnknownToken):
                await replicas[0].authenticate(request(f"pst_made_up_{i}"))
        assert len(replicas[0]._cache) == 1

        new_token = (await rotate(admin, community_id))["new_access_token"]
        for replica in replicas:
            async with asyncio.timeout(5):
                while replica._cache:  # the notice is delivered asynchronously
                    await asyncio.sleep(0.01)
            with pytest.raises(UnknownToken):
                await replica.authenticate(request(token))
            assert (await replica.authenticate(request(new_token))).community_id == community_id
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def test_a_kept_token_lapses_after_the_cache_period(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    """Without a notice (lost, or a replica that was disconnected), a rotated token stops
    working once the cache period is over; with a period of 0 nothing is kept."""
    community_id = await new_community(admin)
    token = (await rotate(admin, community_id))["new_access_token"]
    headers = [(b"authorization", f"Bearer {token}".encode())]
    req = Request({"type": "http", "headers": headers, "client": ("10.0.0.2", 1)})
    kept = CommunityAuth(admin_pool, rate_limiter=None, failures_per_minute=100, cache_seconds=0.5)
    uncached = CommunityAuth(admin_pool, rate_limiter=None, failures_per_minute=100)
    assert (await kept.authenticate(req)).community_id == community_id
    assert (await uncached.authenticate(req)).community_id == community_id
    await community_tokens.rotate_access_token(admin_pool, community_id)  # no notice
    with pytest.raises(UnknownToken):
        await uncached.authenticate(req)
    assert (await kept.authenticate(req)).community_id == community_id  # still kept
    await asyncio.sleep(0.6)
    with pytest.raises(UnknownToken):
        await kept.authenticate(req)

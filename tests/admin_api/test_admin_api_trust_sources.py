"""``POST /api/v1/sources/muninn/set_member_directory_event``: policyserv's body and echo,
only server names stored, malformed events refused with nothing stored."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from tests.admin_api.admin_api_helpers import assert_matrix_error
from warden.trust import muninn

PATH = "/api/v1/sources/muninn/set_member_directory_event"


def muninn_event(directory: Any) -> dict[str, Any]:
    """A Muninn Hall bot event as policyserv's test sends it."""
    return {
        "content": {
            "com.muninn-hall.member_directory": directory,
            "body": "Member Directory - plaintext body not available",
            "format": "org.matrix.custom.html",
            "formatted_body": "snipped",
            "m.mentions": {},
            "msgtype": "m.notice",
        },
        "origin_server_ts": 1764558177788,
        "sender": "@muninn:example.org",
        "type": "m.room.message",
        "event_id": "$example2",
        "room_id": "!muninn:example.org",
    }


@pytest.fixture(autouse=True)
async def no_directory(admin_pool: asyncpg.Pool) -> None:
    await admin_pool.execute("DELETE FROM trust_data WHERE source_name = 'muninn_hall'")


async def test_the_directorys_servers_are_stored_and_the_event_echoed(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    body = muninn_event(
        {
            "one.example.org": ["@user:example.org"],
            "two.example.org": ["@user:example.org"],
            "three.example.org:8448": ["@user:example.org"],
        }
    )
    r = await admin.post(PATH, content=orjson.dumps(body))
    assert r.status_code == 200, r.text
    assert r.json() == body
    assert await muninn.load_servers(admin_pool) == {
        "one.example.org",
        "two.example.org",
        "three.example.org:8448",
    }
    # A new directory replaces the old one.
    r = await admin.post(PATH, json=muninn_event({"four.example.org": []}))
    assert r.status_code == 200
    assert await muninn.load_servers(admin_pool) == {"four.example.org"}


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        (b"not json", "M_NOT_JSON"),
        (b"[]", "M_BAD_JSON"),
        (orjson.dumps({"content": {}}), "M_BAD_JSON"),
        (orjson.dumps(muninn_event(["a.example.org"])), "M_BAD_JSON"),
        (orjson.dumps(muninn_event({"not a server!": []})), "M_BAD_JSON"),
    ],
    ids=["not-json", "not-an-object", "no-directory", "list", "bad-server-name"],
)
async def test_a_malformed_event_is_refused_and_nothing_stored(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, body: bytes, errcode: str
) -> None:
    await muninn.store_servers(admin_pool, ["kept.example.org"], source="test")
    r = await admin.post(PATH, content=body)
    assert_matrix_error(r, 400, errcode)
    assert await muninn.load_servers(admin_pool) == {"kept.example.org"}


async def test_too_many_servers_are_refused(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(muninn, "MAX_SERVERS", 3)
    directory = {f"s{i}.example.org": [] for i in range(4)}
    r = await admin.post(PATH, json=muninn_event(directory))
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert "more than 3" in message
    assert await muninn.load_servers(admin_pool) == frozenset()


async def test_the_route_needs_the_api_key(anonymous: httpx.AsyncClient) -> None:
    r = await anonymous.post(PATH, json=muninn_event({"a.example.org": []}))
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")

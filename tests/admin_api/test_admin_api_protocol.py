"""The admin API as a whole: OpenAPI document, Matrix errors for routing, body limits,
NATS outages, and no 500 for any body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import nats
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from tests.admin_api.admin_api_helpers import (
    API_KEY,
    AUTH,
    NATS_URL,
    assert_matrix_error,
    build_test_app,
    client_for,
    reset_database,
)
from warden.policy.config import known_keys
from warden_gateway.admin_api import MAX_BODY_BYTES

ENDPOINTS = {
    "/api/v1/rooms": {"get"},
    "/api/v1/rooms/{room_id}": {"get", "put", "delete"},
    # join and leave are registered only with a RoomJoiner (tests/membership covers them).
    "/api/v1/rooms/{room_id}/approve_invite": {"get", "post", "delete"},
    "/api/v1/set_room_moderator": {"post"},
    "/api/v1/communities": {"get"},
    "/api/v1/communities/new": {"post"},
    "/api/v1/communities/{community_id}": {"get", "patch", "delete"},
    "/api/v1/communities/{community_id}/rotate_access_token": {"post"},
    "/api/v1/communities/{community_id}/config": {"post"},
    "/api/v1/instance/community_config": {"get"},
    "/api/v1/events/{event_id}": {"get"},
    "/api/v1/keyword_templates/{name}": {"get", "post", "delete"},
    "/api/v1/sources/muninn/set_member_directory_event": {"post"},
}


async def test_openapi_lists_every_endpoint_with_models(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/api/v1/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert {p: set(ops) for p, ops in doc["paths"].items()} == ENDPOINTS
    schemas = doc["components"]["schemas"]
    for model in (
        "Community",
        "NewCommunityRequest",
        "CommunityPatch",
        "Room",
        "ProtectRoomRequest",
        "SetRoomModeratorRequest",
        "Verdict",
        "FilterOutcome",
        "MatrixErrorBody",
    ):
        assert model in schemas, model
    assert set(schemas["Room"]["properties"]) == {
        "room_id",
        "room_version",
        "moderator_user_id",
        "last_cached_state_timestamp",
        "community_id",
    }
    assert "class" in schemas["Verdict"]["properties"]
    name = schemas["NewCommunityRequest"]["properties"]["name"]
    assert (name["minLength"], name["maxLength"]) == (3, 255)
    # The config is documented key by key from the declared keys, types and defaults.
    config = schemas["Community"]["properties"]["config"]
    assert config["additionalProperties"] is False
    community_keys = {k.name: k for k in known_keys().values() if not k.instance_only}
    assert set(config["properties"]) == set(community_keys)
    assert config["properties"]["spam_threshold"]["type"] == "number"
    assert config["properties"]["spam_threshold"]["default"] == 0.8
    # The API key is the security scheme of every operation, and no operation claims
    # FastAPI's 422 body: validation errors are 400 Matrix errors here.
    assert doc["components"]["securitySchemes"]["PS_API_KEY"]["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["security"] == [{"PS_API_KEY": []}], (path, method)
            assert "422" not in op["responses"], (path, method)
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/MatrixErrorBody"
            }
    assert "HTTPValidationError" not in schemas
    assert doc["paths"]["/api/v1/set_room_moderator"]["post"]["deprecated"] is True


async def test_unknown_paths_and_methods_are_m_unrecognized(admin: httpx.AsyncClient) -> None:
    for path in ("/api/v1/nothing", "/api/v1/rooms/!a:b.c/join", "/api/v1/communitie"):
        assert_matrix_error(await admin.get(path), 404, "M_UNRECOGNIZED")
    r = await admin.post("/api/v1/rooms")
    assert_matrix_error(r, 405, "M_UNRECOGNIZED")
    assert "GET" in r.headers["allow"]
    assert_matrix_error(await admin.put("/api/v1/communities/default"), 405, "M_UNRECOGNIZED")


async def test_bodies_over_the_limit_are_m_too_large(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    big = json.dumps({"webhook_url": "x" * MAX_BODY_BYTES}).encode()
    r = await admin.post("/api/v1/communities/default/config", content=big)
    assert_matrix_error(r, 413, "M_TOO_LARGE")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(4):
            yield b" " * (MAX_BODY_BYTES // 2)
        yield b"{}"

    r = await admin.post(
        "/api/v1/communities/default/config",
        content=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert_matrix_error(r, 413, "M_TOO_LARGE")
    assert await admin_pool.fetchval("SELECT config FROM communities WHERE id='default'") == "{}"
    # Just under the limit is fine.
    ok = b'{"webhook_url": ""}' + b" " * (MAX_BODY_BYTES - 100)
    r = await admin.post("/api/v1/communities/default/config", content=ok)
    assert r.status_code == 200, r.text


async def test_a_failed_notification_is_503_and_the_change_is_kept(
    admin_pool: asyncpg.Pool,
) -> None:
    dead = await nats.connect(NATS_URL)
    await dead.close()
    async with client_for(build_test_app(API_KEY, admin_pool, dead), AUTH) as c:
        r = await c.patch("/api/v1/communities/default", json={"config": {"spam_threshold": 0.3}})
        assert "repeat" in assert_matrix_error(r, 503, "M_UNKNOWN")
        r = await c.get("/api/v1/communities/default")
        assert r.json()["config"] == {"spam_threshold": 0.3}


# JSON-ish bodies: any JSON value, objects shaped like the real ones, and raw bytes.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    [
        "name",
        "config",
        "can_self_join_rooms",
        "room_version",
        "community_id",
        "room_id",
        "moderator_user_id",
        "spam_threshold",
        "webhook_url",
    ]
)
_shaped = st.dictionaries(
    _field_names, _json | st.dictionaries(_field_names, _json, max_size=3), max_size=4
)
_bodies = (
    _json.map(lambda v: json.dumps(v).encode())
    | _shaped.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
)
_requests = st.sampled_from(
    [
        ("POST", "/api/v1/communities/new"),
        ("PATCH", "/api/v1/communities/default"),
        ("POST", "/api/v1/communities/default/config"),
        ("PUT", "/api/v1/rooms/!fuzz:example.org"),
        ("PUT", "/api/v1/rooms/%21fuzz"),
        ("POST", "/api/v1/set_room_moderator"),
    ]
)
_content_types = st.sampled_from([None, "application/json", "text/plain", "application/x+json"])


class _Harness:
    def __init__(self, pool: asyncpg.Pool, nc: NATS, client: httpx.AsyncClient) -> None:
        self.pool, self.nc, self.client = pool, nc, client


async def _start(database: str) -> _Harness:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=2)
    assert pool is not None
    await reset_database(pool)
    nc = await nats.connect(NATS_URL)
    app: FastAPI = build_test_app(API_KEY, pool, nc)
    return _Harness(pool, nc, client_for(app, AUTH))


async def _stop(h: _Harness) -> None:
    await h.client.aclose()
    await h.nc.close()
    await reset_database(h.pool)
    await h.pool.close()


def test_no_body_makes_a_server_error(admin_pg_database: str) -> None:
    # Hypothesis drives a synchronous test; the app runs on one loop for all examples.
    loop = asyncio.new_event_loop()
    harness = loop.run_until_complete(_start(admin_pg_database))
    seen: dict[int, int] = {}
    try:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(request=_requests, body=_bodies, content_type=_content_types)
        def check(request: tuple[str, str], body: bytes, content_type: str | None) -> None:
            method, path = request
            headers = {"Content-Type": content_type} if content_type else {}
            r = loop.run_until_complete(
                harness.client.request(method, path, content=body, headers=headers)
            )
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, path, body, r.text)
            payload: Any = r.json()
            if r.status_code >= 400:
                assert isinstance(payload["errcode"], str) and payload["errcode"].startswith("M_")
                assert isinstance(payload["error"], str)

        check()
    finally:
        loop.run_until_complete(_stop(harness))
        loop.close()
    # The fuzz reached both the refusals and the handlers behind them.
    assert 400 in seen and 200 in seen, seen

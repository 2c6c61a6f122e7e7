"""The admin API's key check: every route, before the body is read."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from tests.admin_api.admin_api_helpers import API_KEY, assert_matrix_error, client_for
from warden.matrix.errors import LimitExceeded
from warden_gateway.admin_api import build_admin_router
from warden_gateway.admin_auth import AdminAuthThrottle

# One request per route (bodies valid where there are bodies).
ROUTES = [
    ("GET", "/api/v1/rooms", None),
    ("GET", "/api/v1/rooms/!r:example.org", None),
    ("PUT", "/api/v1/rooms/!r:example.org", {"room_version": "11", "community_id": "default"}),
    ("DELETE", "/api/v1/rooms/!r:example.org", None),
    ("POST", "/api/v1/set_room_moderator", {"room_id": "!r:x.org", "moderator_user_id": ""}),
    ("POST", "/api/v1/communities/new", {"name": "Some community"}),
    ("GET", "/api/v1/communities/default", None),
    ("PATCH", "/api/v1/communities/default", {"name": "Renamed"}),
    ("POST", "/api/v1/communities/default/config", {}),
    ("GET", "/api/v1/instance/community_config", None),
    ("GET", "/api/v1/events/$abc", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_refuses_a_missing_key(
    anonymous: httpx.AsyncClient, admin_pool: asyncpg.Pool, method: str, path: str, body: object
) -> None:
    r = await anonymous.request(method, path, json=body)
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")
    # Nothing was changed by the refused request.
    assert await admin_pool.fetchval("SELECT count(*) FROM rooms") == 0
    assert await admin_pool.fetchval("SELECT count(*) FROM communities") == 1
    assert await admin_pool.fetchval("SELECT name FROM communities") == "Default community"


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer wrong",
        b"Bearer " + API_KEY.encode()[:-1],  # a prefix of the key
        b"Bearer " + API_KEY.encode() + b"x",  # the key plus one byte
        b"Basic " + API_KEY.encode(),  # right secret, wrong scheme
        API_KEY.encode(),  # no scheme
        b"Bearer",
        b"Bearer ",
        b"",
    ],
)
async def test_wrong_keys_are_refused(admin_app: FastAPI, header: bytes) -> None:
    async with client_for(admin_app, {"Authorization": header}) as c:
        r = await c.get("/api/v1/rooms")
    assert_matrix_error(r, 401, "M_UNAUTHORIZED")


async def test_the_right_key_is_accepted_with_any_scheme_case(admin_app: FastAPI) -> None:
    for scheme in (b"Bearer ", b"bearer ", b"BEARER "):
        async with client_for(admin_app, {"Authorization": scheme + API_KEY.encode()}) as c:
            r = await c.get("/api/v1/rooms")
        assert r.status_code == 200, r.text
        assert r.json() == []


async def test_auth_is_checked_before_the_body(anonymous: httpx.AsyncClient) -> None:
    # An unauthenticated caller learns nothing about what the body would have produced.
    for content in (b"{not json", b'{"name": 1}', b"x" * (2 * 1024 * 1024)):
        r = await anonymous.post(
            "/api/v1/communities/new",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert_matrix_error(r, 401, "M_UNAUTHORIZED")


def test_an_empty_key_cannot_build_the_router(
    admin_pool: asyncpg.Pool, publisher_nats: NATS
) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_admin_router(api_key="", pool=admin_pool, nats=publisher_nats)


# --- throttling of failed authentications (review M11) ---


def _failures(outcome: str) -> float:
    value = REGISTRY.get_sample_value("warden_admin_auth_failures_total", {"outcome": outcome})
    return value or 0.0


def _client_at(app: FastAPI, address: str, headers: dict[str, Any]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 4242))
    return httpx.AsyncClient(transport=transport, base_url="http://admin", headers=headers)


async def test_failed_authentications_are_throttled_per_client_address(
    admin_app: FastAPI,
) -> None:
    wrong = {"Authorization": b"Bearer guess"}
    right = {"Authorization": b"Bearer " + API_KEY.encode()}
    refused, throttled = _failures("refused"), _failures("throttled")
    async with _client_at(admin_app, "192.0.2.50", wrong) as guesser:
        for _ in range(10):  # PS_ADMIN_AUTH_FAILURES_PER_MINUTE
            assert_matrix_error(await guesser.get("/api/v1/rooms"), 401, "M_UNAUTHORIZED")
        r = await guesser.get("/api/v1/rooms")
        assert_matrix_error(r, 429, "M_LIMIT_EXCEEDED")
        assert 0 < r.json()["retry_after_ms"] <= 60_000
        assert 1 <= int(r.headers["retry-after"]) <= 60
    # From that address even the right key waits: the key is not compared at all.
    async with _client_at(admin_app, "192.0.2.50", right) as same_address:
        assert_matrix_error(await same_address.get("/api/v1/rooms"), 429, "M_LIMIT_EXCEEDED")
    # Another address is not affected.
    async with _client_at(admin_app, "192.0.2.51", right) as other:
        assert (await other.get("/api/v1/rooms")).status_code == 200
    assert _failures("refused") == refused + 10
    assert _failures("throttled") == throttled + 2


def test_the_throttle_forgets_after_a_minute() -> None:
    now = [1000.0]
    throttle = AdminAuthThrottle(3, clock=lambda: now[0])
    for _ in range(3):
        throttle.check("2001:db8::1")
        throttle.failed("2001:db8::1")
    with pytest.raises(LimitExceeded):
        throttle.check("2001:db8::2")  # the same /64
    throttle.check("2001:db8:1::1")  # another /64
    now[0] += 60.0
    throttle.check("2001:db8::1")
    throttle.failed("2001:db8::1")  # a new window: one failure so far
    throttle.check("2001:db8::1")

"""``PS_ADMIN_HTTP_BIND``: the admin API on a listener of its own (review M11).

A real gateway process: with the setting, ``/api/v1`` (and its OpenAPI document) is
served only on the admin listener and the federation listener answers 404 there; without
it, the admin API stays beside federation (the default, kept for compatibility).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.service_processes import ServiceProcess, free_port

pytestmark = pytest.mark.slow

API_KEY = "listener-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_the_admin_api_moves_to_its_own_listener(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    admin_bind = f"127.0.0.1:{free_port()}"
    gateway = spawn_service("gateway", PS_API_KEY=API_KEY, PS_ADMIN_HTTP_BIND=admin_bind)
    gateway.wait_ready()
    admin = f"http://{admin_bind}"
    r = httpx.get(f"{admin}/api/v1/rooms", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{admin}/api/v1/openapi.json", timeout=10).status_code == 200
    r = httpx.get(f"{admin}/api/v1/rooms", timeout=10)
    assert r.status_code == 401
    assert r.json()["errcode"] == "M_UNAUTHORIZED"
    # Federation is not on the admin listener.
    assert httpx.get(f"{admin}/_matrix/key/v2/server", timeout=10).status_code == 404
    # And the admin API is not on the federation listener.
    for path in ("/api/v1/rooms", "/api/v1/openapi.json"):
        r = httpx.get(f"{gateway.api_url}{path}", headers=AUTH, timeout=10)
        assert r.status_code == 404, (path, r.text)
    assert httpx.get(f"{gateway.api_url}/_matrix/key/v2/server", timeout=10).status_code == 200
    assert gateway.stop() == 0


def test_without_the_setting_the_admin_api_stays_beside_federation(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = spawn_service("gateway", PS_API_KEY=API_KEY)
    gateway.wait_ready()
    r = httpx.get(f"{gateway.api_url}/api/v1/rooms", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text

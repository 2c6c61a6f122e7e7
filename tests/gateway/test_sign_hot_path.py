"""``/sign`` is dispatched before FastAPI's router; behaviour is unchanged."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from prometheus_client import REGISTRY
from starlette.requests import Request
from starlette.routing import Route

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    UNSTABLE_SIGN_PATH,
    Gateway,
    Origin,
    StandInWorker,
    new_room_id,
)
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden_gateway.hot_path import HotPathMiddleware


async def test_sign_does_not_need_the_framework_router(
    gateway: Gateway,
    origin: Origin,
    start_worker: Callable[..., Awaitable[StandInWorker]],
    protect_room: Callable[..., Awaitable[str]],
) -> None:
    await start_worker()
    room_id = await protect_room(new_room_id("11"), "11")
    # Take /sign out of FastAPI's router: only the hot path can still answer it.
    fastapi_routes: list[Any] = gateway.app.fastapi.router.routes
    fastapi_routes[:] = [
        r for r in fastapi_routes if getattr(r, "path", "") not in (SIGN_PATH, UNSTABLE_SIGN_PATH)
    ]

    def signed_count() -> float:
        labels = {"route": SIGN_PATH, "method": "POST", "status": "200"}
        return REGISTRY.get_sample_value("warden_http_requests_total", labels) or 0.0

    before = signed_count()
    event = origin.event(room_id, "11", body="fine")
    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )
    assert r.status_code == 200, r.text
    assert POLICY_SERVER_KEY_ID in r.json()[GATEWAY_NAME]
    assert signed_count() == before + 1  # labelled by the route template
    # Other methods and paths still go to the router (and its Matrix errors).
    r = await gateway.client.get(SIGN_PATH)
    assert r.status_code == 404  # the router no longer has it at all
    assert r.json()["errcode"] == "M_UNRECOGNIZED"


async def test_a_bug_in_a_hot_handler_is_a_matrix_500() -> None:
    async def broken(request: Request) -> Any:
        raise RuntimeError("bug")

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the hot path fell through to the app")

    app = HotPathMiddleware(never, routes=[Route("/x", broken, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/x", content=b"{}")
    assert r.status_code == 500
    assert r.json() == {"errcode": "M_UNKNOWN", "error": "Internal server error"}

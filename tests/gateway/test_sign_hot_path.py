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


async def test_a_route_with_path_parameters_is_dispatched_with_them() -> None:
    """The antispam callbacks' route (``.../{callback}``) is matched by the hot path and
    gets its path parameters; other paths under the prefix, deeper paths and other
    methods fall through to the app."""
    seen: list[dict[str, Any]] = []

    async def handler(request: Request) -> Any:
        from starlette.responses import JSONResponse

        seen.append(dict(request.path_params))
        return JSONResponse({"route": request.scope["route"].path})

    fell_through: list[str] = []

    async def app_below(scope: Any, receive: Any, send: Any) -> None:
        from starlette.responses import Response

        fell_through.append(f"{scope['method']} {scope['path']}")
        await Response(b"", status_code=404)(scope, receive, send)

    path = "/_warden/antispam/v1/{callback}"
    ping = "/_warden/antispam/v1/ping"
    routes = [Route(path, handler, methods=["POST"]), Route(ping, handler, methods=["POST"])]
    hot = HotPathMiddleware(app_below, routes=routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hot), base_url="http://t") as c:
        r = await c.post("/_warden/antispam/v1/check_event_for_spam", content=b"{}")
        assert r.status_code == 200 and r.json() == {"route": path}
        assert seen == [{"callback": "check_event_for_spam"}]
        # An exact path wins over a pattern that also matches it, whatever the order.
        assert (await c.post(ping, content=b"{}")).json() == {"route": ping}
        assert seen[-1] == {}
        assert (await c.post("/_warden/antispam/v1/a/b")).status_code == 404
        assert (await c.get("/_warden/antispam/v1/check_event_for_spam")).status_code == 404
        assert (await c.post("/_warden/antispam/v2/x")).status_code == 404
    assert fell_through == [
        "POST /_warden/antispam/v1/a/b",
        "GET /_warden/antispam/v1/check_event_for_spam",
        "POST /_warden/antispam/v2/x",
    ]
    assert len(seen) == 2


async def test_the_hot_path_meters_and_traces_its_requests_itself() -> None:
    """Outermost, the hot path records the HTTP metrics (by route template, with the
    answer's status) and serves the request in the caller's trace context; nothing below
    it sees the request, so nothing counts it twice."""
    from starlette.responses import JSONResponse

    from warden.telemetry.tracing import inject_headers

    sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    path = "/_test/hot/{name}"

    async def handler(request: Request) -> Any:
        status = 400 if request.path_params["name"] == "refused" else 200
        return JSONResponse(inject_headers(), status_code=status)

    async def never(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the hot path fell through to the app")

    def count(status: str) -> float:
        labels = {"route": path, "method": "POST", "status": status}
        return REGISTRY.get_sample_value("warden_http_requests_total", labels) or 0.0

    before = {s: count(s) for s in ("200", "400")}
    hot = HotPathMiddleware(never, routes=[Route(path, handler, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hot), base_url="http://t") as c:
        r = await c.post("/_test/hot/a", headers={"traceparent": sampled, "tracestate": "v=1"})
        assert r.json() == {"traceparent": sampled, "tracestate": "v=1"}
        assert (await c.post("/_test/hot/a")).json() == {}  # detached: nothing leaks
        assert (await c.post("/_test/hot/refused")).status_code == 400
    assert count("200") == before["200"] + 2
    assert count("400") == before["400"] + 1

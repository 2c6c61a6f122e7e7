"""ASGI middleware counting requests and timing them by route template.

The label is the matched route's path template (``/_matrix/policy/v1/sign``), never
the raw path, so IDs in paths cannot blow up the metric's cardinality.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warden.telemetry.loop_counter import LoopCounterChild
from warden.telemetry.loop_histogram import LoopHistogramChild
from warden.telemetry.metrics import HTTP_DURATION, HTTP_REQUESTS

UNMATCHED = "<unmatched>"


class HttpMetricsRecorder:
    """Records one answered request in the HTTP metrics, by route template."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[LoopCounterChild, LoopHistogramChild]] = {}

    def record(self, template: str, method: str, status: int, seconds: float) -> None:
        """Count the request and observe its duration."""
        if method not in _METHODS:
            method = "other"
        key = (template, method, status)
        children = self._children.get(key)
        if children is None:
            # Bound once per label set (bounded: templates, methods and statuses):
            # ``labels()`` builds a key on every call.
            children = self._children[key] = (
                HTTP_REQUESTS.labels(template, method, str(status)),
                HTTP_DURATION.labels(template, method),
            )
        children[0].inc()
        children[1].observe(seconds)


class HttpMetricsMiddleware:
    """Record ``warden_http_requests_total`` and ``warden_http_request_duration_seconds``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._paths: dict[object, str] | None = None
        self._recorder = HttpMetricsRecorder()

    def _template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", UNMATCHED))
        # FastAPI's router records only the endpoint for plain Starlette routes; map it
        # back to its path template (built once: routes are fixed after start-up).
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return UNMATCHED
        if self._paths is None:
            router = scope.get("router")
            routes = getattr(router, "routes", [])
            self._paths = {
                getattr(r, "endpoint", None): str(getattr(r, "path", UNMATCHED)) for r in routes
            }
        return self._paths.get(endpoint, UNMATCHED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._recorder.record(
                self._template(scope), scope["method"], status, time.perf_counter() - start
            )


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})

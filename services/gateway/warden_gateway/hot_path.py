"""The shortest way from uvicorn to the ``/sign`` handlers.

``/sign`` is the one endpoint every server in a room calls at once during a spam wave.
Through FastAPI it would cross FastAPI's own middleware, its router (a scan of every
route) and per-route wrappers for each request; measured with ``make bench``, that was
about a third of the gateway's CPU per request. This middleware wraps the FastAPI app
(inside only the HTTP metrics) and hands ``POST`` to the exact ``/sign`` paths straight
to their handlers. The same routes stay registered on the FastAPI app, so behaviour is
the same either way.

It is the outermost layer of the gateway's app: for its routes it records the HTTP
metrics and attaches a caller's trace context itself, as ``HttpMetricsMiddleware`` and
``TraceContextMiddleware`` do for every other request, without their two extra layers and
the wrapper around ``send`` (a few hundredths of the gateway's CPU per repeat ``/sign``).

A route with path parameters (the homeserver spam-checker callbacks,
``/_warden/antispam/v1/{callback}``, asked once per message a homeserver sends) is matched
by its literal prefix and then its own pattern, as Starlette's router would; exact paths
(``.../ping``) are matched first.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import context as otel_context
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from warden.telemetry.http import HttpMetricsRecorder
from warden.telemetry.trace_http import incoming_trace_context
from warden_gateway.errors import matrix_error_response

logger = logging.getLogger(__name__)


class HotPathMiddleware:
    """Dispatch ``POST`` routes without the framework's router, with their HTTP metrics
    and trace context; ``app`` (the metered, traced stack) serves every other request."""

    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self._metrics = HttpMetricsRecorder()
        posts = [r for r in routes if r.methods is not None and "POST" in r.methods]
        self._routes = {r.path: r for r in posts if "{" not in r.path}
        # (literal prefix, route) of the routes with path parameters.
        self._patterns = [(r.path.partition("{")[0], r) for r in posts if "{" in r.path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: Route | None = None
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            route = self._routes.get(path)
            if route is None:
                for prefix, candidate in self._patterns:
                    if path.startswith(prefix):
                        match, child = candidate.matches(scope)
                        if match is Match.FULL:
                            scope.update(child)  # path_params, as the router sets them
                            route = candidate
                            break
        if route is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope["route"] = route
        status = 500
        incoming = incoming_trace_context(scope["headers"])
        token = otel_context.attach(incoming) if incoming is not None else None
        try:
            try:
                response = await route.endpoint(Request(scope, receive, send))
            except Exception:
                # The handlers answer every client error themselves; this is our bug.
                logger.exception("unhandled error", extra={"path": scope["path"]})
                response = matrix_error_response(500, "M_UNKNOWN", "Internal server error")
            status = response.status_code
            await response(scope, receive, send)
        finally:
            if token is not None:
                otel_context.detach(token)
            # Labelled by the route's path template, as HttpMetricsMiddleware does.
            self._metrics.record(route.path, "POST", status, time.perf_counter() - start)

"""The shortest way from uvicorn to the ``/sign`` handlers.

``/sign`` is the one endpoint every server in a room calls at once during a spam wave.
Through FastAPI it would cross FastAPI's own middleware, its router (a scan of every
route) and per-route wrappers for each request; measured with ``make bench``, that was
about a third of the gateway's CPU per request. This middleware wraps the FastAPI app
(inside only the HTTP metrics) and hands ``POST`` to the exact ``/sign`` paths straight
to their handlers. The same routes stay registered on the FastAPI app, so behaviour is
the same either way.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from warden_gateway.errors import matrix_error_response

logger = logging.getLogger(__name__)


class HotPathMiddleware:
    """Dispatch exact-path ``POST`` routes without the framework's router."""

    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self._routes = {r.path: r for r in routes if r.methods is not None and "POST" in r.methods}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (
            self._routes.get(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # the metrics label: the route's path template
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception:
            # The handlers answer every client error themselves; this is our bug.
            logger.exception("unhandled error", extra={"path": scope["path"]})
            response = matrix_error_response(500, "M_UNKNOWN", "Internal server error")
        await response(scope, receive, send)

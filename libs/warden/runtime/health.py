"""``/livez``, ``/readyz`` and ``/metrics`` as Starlette routes.

``/livez`` answers 200 while the process's event loop runs. It is served by that loop
(the metrics listener runs on it), which is the point: a loop wedged by CPU-bound code
cannot answer, the probe times out and the pod is replaced. Serving it from another
thread would need a loop heartbeat check to keep that property. ``/readyz`` answers 200
only when every required dependency check passes and the service is not shutting
down; it lists each check's result so an operator sees which dependency failed. A
dependency the service can work without (Redis for the gateway and the filter workers,
see ``warden.runtime.redis_outage``) is an optional check: when it fails, readiness
stays 200 with ``"status": "degraded"`` and the check's failure listed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.telemetry.metrics import DEPENDENCY_UP, READY, render_latest

logger = logging.getLogger(__name__)

Check = Callable[[], Awaitable[object]]
CHECK_TIMEOUT_SECONDS = 2.0


class Health:
    """A service's health state: its dependency checks and whether it is draining."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.checks: dict[str, Check] = {}
        self.optional: set[str] = set()
        self.draining = False

    def add_check(self, name: str, check: Check, *, required: bool = True) -> None:
        """Register a dependency check; it passes when it returns without raising.

        A check not ``required`` does not make the service unready when it fails.
        """
        self.checks[name] = check
        if not required:
            self.optional.add(name)

    async def run_checks(self) -> dict[str, str]:
        """Run every check concurrently; map each name to ``ok`` or the failure."""

        async def one(name: str, check: Check) -> tuple[str, str]:
            try:
                await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
            except Exception as exc:  # any failure means not ready, with the reason
                DEPENDENCY_UP.labels(self.service, name).set(0)
                return name, f"failed: {type(exc).__name__}: {exc}"[:300]
            DEPENDENCY_UP.labels(self.service, name).set(1)
            return name, "ok"

        results = await asyncio.gather(*(one(n, c) for n, c in self.checks.items()))
        return dict(results)

    async def livez(self, request: Request) -> Response:
        """Liveness: the event loop answers."""
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(self, request: Request) -> Response:
        """Readiness: dependencies answer and the service is not draining."""
        if self.draining:
            READY.labels(self.service).set(0)
            body = {"status": "draining", "checks": {}}
            return Response(orjson.dumps(body), status_code=503, media_type="application/json")
        results = await self.run_checks()
        ok = all(v == "ok" for n, v in results.items() if n not in self.optional)
        READY.labels(self.service).set(1 if ok else 0)
        status = "ok" if ok else "unavailable"
        if ok and any(v != "ok" for v in results.values()):
            status = "degraded"
        body = {"status": status, "checks": results}
        return Response(
            orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json"
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition of the process's registry."""
        data, content_type = render_latest()
        return Response(data, media_type=content_type)

    def routes(self, *, with_metrics: bool = True) -> list[Route]:
        """The health routes (and ``/metrics``) to mount on an app."""
        routes = [
            Route("/livez", self.livez, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]
        if with_metrics:
            routes.append(Route("/metrics", self.metrics, methods=["GET"]))
        return routes

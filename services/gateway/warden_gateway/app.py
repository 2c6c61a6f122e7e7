"""The gateway's ASGI app.

Federation routes (and, later, ``/sign``) are plain Starlette routes: they are the hot
path and skip FastAPI's per-request validation. FastAPI serves the admin API and its
OpenAPI document.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.matrix.errors import MatrixError
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.telemetry.http import HttpMetricsMiddleware
from warden.telemetry.metrics import WARDEN_VERSION
from warden_gateway.errors import on_http_exception, on_matrix_error, on_unexpected
from warden_gateway.server_keys import ServerKeyEndpoint

_VERSION_BODY = orjson.dumps({"server": {"name": "warden", "version": WARDEN_VERSION}})


async def federation_version(request: Request) -> Response:
    """``GET /_matrix/federation/v1/version``."""
    return Response(_VERSION_BODY, media_type="application/json")


def build_app(identity: Identity, health: Health) -> FastAPI:
    """Assemble the gateway app for one identity; ``health`` backs /livez and /readyz."""
    app = FastAPI(
        title="Warden",
        version=WARDEN_VERSION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    key_endpoint = ServerKeyEndpoint(identity)
    raw_routes = [
        Route("/_matrix/key/v2/server", key_endpoint.handle, methods=["GET"]),
        Route("/_matrix/federation/v1/version", federation_version, methods=["GET"]),
        *health.routes(with_metrics=False),
    ]
    app.router.routes.extend(raw_routes)
    app.add_exception_handler(MatrixError, on_matrix_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(HttpMetricsMiddleware)
    return app

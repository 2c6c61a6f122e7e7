"""The gateway's ASGI app.

Federation, policy and well-known routes are plain Starlette routes: they are the hot
path and skip FastAPI's per-request validation. FastAPI serves the admin API
(``/api/v1``, only when ``PS_API_KEY`` is set) and its OpenAPI document, next to
federation, or on a listener of its own (``build_admin_app``, ``PS_ADMIN_HTTP_BIND``).
"""

from __future__ import annotations

import inspect
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from warden.matrix.errors import MatrixError
from warden.runtime.client_penalties import ClientPenalties
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.settings import Settings
from warden.telemetry.http import HttpMetricsMiddleware
from warden.telemetry.metrics import WARDEN_VERSION
from warden.telemetry.trace_http import TraceContextMiddleware
from warden.telemetry.tracing import exporting
from warden_gateway.antispam import AntispamAPI
from warden_gateway.errors import on_http_exception, on_matrix_error, on_unexpected
from warden_gateway.event_id_check import EventIdCheck
from warden_gateway.federation_inbound import FederationInbound
from warden_gateway.hot_path import HotPathMiddleware
from warden_gateway.invites import InviteAPI
from warden_gateway.policy_api import SIGN_PATH, UNSTABLE_SIGN_PATH, PolicyAPI
from warden_gateway.server_centric import ServerCentricAPI
from warden_gateway.server_keys import ServerKeyEndpoint
from warden_gateway.well_known import WellKnown

# Exact paths served by HotPathMiddleware (``/check`` has a path parameter: it stays
# with the router).
HOT_PATHS = frozenset({SIGN_PATH, UNSTABLE_SIGN_PATH})

OPENAPI_PATH = "/api/v1/openapi.json"

_VERSION_BODY = orjson.dumps({"server": {"name": "warden", "version": WARDEN_VERSION}})


async def federation_version(request: Request) -> Response:
    """``GET /_matrix/federation/v1/version``."""
    return Response(_VERSION_BODY, media_type="application/json")


def build_app(
    identity: Identity,
    health: Health,
    *,
    settings: Settings | None = None,
    policy: PolicyAPI | None = None,
    admin_router: APIRouter | None = None,
    federation: FederationInbound | None = None,
    invites: InviteAPI | None = None,
    event_id_check: EventIdCheck | None = None,
    server_centric: ServerCentricAPI | None = None,
    antispam: AntispamAPI | None = None,
    penalties: ClientPenalties | None = None,
) -> GatewayApp:
    """Assemble the gateway app for one identity.

    ``health`` is not served here: ``/livez`` and ``/readyz`` live only on the metrics
    listener (``PS_HTTP_METRICS_BIND``), since ``/readyz`` runs a PostgreSQL, Redis and
    NATS check per call and names internal hosts in its answer (review M7). The
    parameter stays so that callers need not change.

    ``settings`` feed the well-known documents (defaults when omitted). ``policy``
    adds ``/sign`` and ``/check``. ``admin_router`` is the admin API router (built by
    ``admin_api.build_admin_router``, which carries the ``/api/v1`` prefix); pass it
    only when ``PS_API_KEY`` is set. ``federation`` adds ``/send`` and the user queries.
    ``invites`` adds the ``/invite`` routes (v2 and v1). ``server_centric`` adds the
    community-token API (``/_policyserv/v1``), ``event_id_check`` its
    ``POST /_policyserv/v1/check/event_id``. ``antispam`` adds the homeserver
    spam-checker callbacks (``/_warden/antispam/v1``).

    The result is the FastAPI app wrapped in the HTTP metrics and, when ``policy`` is
    given, the hot-path dispatcher for ``/sign`` (see ``hot_path``); ``.fastapi`` is the
    app itself.
    """
    settings = settings or Settings(homeserver_name=identity.server_name)
    app = FastAPI(
        title="Warden",
        version=WARDEN_VERSION,
        docs_url=None,
        redoc_url=None,
        # The document describes the admin API only: none without it.
        openapi_url=OPENAPI_PATH if admin_router is not None else None,
        # A path with a trailing slash is unknown (404 M_UNRECOGNIZED), not a bodyless
        # 307 to the path without it: federation peers get Matrix errors only.
        redirect_slashes=False,
        **framework_telemetry(),
    )
    key_endpoint = ServerKeyEndpoint(identity, settings.old_federation_keys)
    raw_routes: list[Route] = [
        Route("/_matrix/key/v2/server", key_endpoint.handle, methods=["GET"]),
        Route("/_matrix/federation/v1/version", federation_version, methods=["GET"]),
        *WellKnown(identity, settings).routes(),
    ]
    hot_routes: list[Route] = []
    if policy is not None:
        raw_routes.extend(policy.routes())
        hot_routes = [r for r in policy.routes() if r.path in HOT_PATHS]
    if federation is not None:
        raw_routes.extend(federation.routes())
    if invites is not None:
        raw_routes.extend(invites.routes())
    if event_id_check is not None:
        raw_routes.extend(event_id_check.routes())
    if server_centric is not None:
        raw_routes.extend(server_centric.routes())
    if antispam is not None:
        raw_routes.extend(antispam.routes())
        # Asked once per message a homeserver sends: the same short way as /sign (its
        # ping too, an exact path, which the hot path matches before any pattern).
        hot_routes.extend(antispam.routes())
    app.router.routes.extend(raw_routes)
    if admin_router is not None:
        from warden_gateway.admin_api import install_admin_error_handlers

        app.include_router(admin_router)
        install_admin_error_handlers(app)
    _add_error_handlers(app)
    # Outside FastAPI: its own middleware (exception handling, telemetry, body limits)
    # costs about a tenth of the gateway's CPU per /sign, which handles all of that itself.
    # Metrics outermost: every request; a caller's trace context around every route. The
    # hot path, outside them, does both itself for its few routes.
    # A 401 from the routes below counts towards its address's penalty (the /sign
    # handlers, on the hot path, count their own failures).
    below: ASGIApp = app if penalties is None else AuthFailureMiddleware(app, penalties)
    served: ASGIApp = HttpMetricsMiddleware(TraceContextMiddleware(below))
    if hot_routes:
        served = HotPathMiddleware(served, hot_routes)
    return GatewayApp(served, app)


def build_admin_app(admin_router: APIRouter) -> GatewayApp:
    """The admin API alone, for its own listener (``PS_ADMIN_HTTP_BIND``).

    Unknown paths get 404 ``M_UNRECOGNIZED`` like on the gateway's main listener.
    """
    from warden_gateway.admin_api import install_admin_error_handlers

    app = FastAPI(
        title="Warden admin API",
        version=WARDEN_VERSION,
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_PATH,
        redirect_slashes=False,  # as on the main listener: 404, never a bodyless 307
        **framework_telemetry(),
    )
    app.include_router(admin_router)
    install_admin_error_handlers(app)
    _add_error_handlers(app)
    return GatewayApp(HttpMetricsMiddleware(TraceContextMiddleware(app)), app)


def framework_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry instrumentation (FastAPI 0.16x): its server span per
    request only when this process exports spans; never its OpenTelemetry metrics or logs.

    It turns itself on whenever a tracer provider is installed, which every Warden process
    does, so it made a span for each request nobody would see: measured with ``make
    bench`` under attack, a few hundredths of the gateway's CPU. Warden's metrics are
    Prometheus's and its logs JSON lines (``warden.telemetry``).
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # an older FastAPI has none
    return {"telemetry": {"tracing": exporting(), "metrics": False, "logs": False}}


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(MatrixError, on_matrix_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)


class AuthFailureMiddleware:
    """Counts each 401 answer towards its client address's authentication-failure
    penalty (``warden.runtime.client_penalties``)."""

    def __init__(self, app: ASGIApp, penalties: ClientPenalties) -> None:
        self.app = app
        self._penalties = penalties

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request; note a 401 answer."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_noting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self._penalties.failed_request(scope)
            await send(message)

        await self.app(scope, receive, send_noting)


class GatewayApp:
    """The gateway's ASGI app: the served stack, with the FastAPI app it wraps."""

    def __init__(self, asgi: ASGIApp, fastapi: FastAPI) -> None:
        self._asgi = asgi
        self.fastapi = fastapi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        await self._asgi(scope, receive, send)

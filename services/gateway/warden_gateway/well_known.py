"""The ``/.well-known/matrix/*`` documents the gateway serves.

* ``policy_server`` (spec v1.18): ``{"public_keys": {"ed25519": <policy key>}}``, what a
  client copies into ``m.room.policy``; the unstable MSC4284 form
  ``org.matrix.msc4284.policy_server`` is ``{"public_key": <policy key>}``. Both are
  read by clients in browsers, so they answer CORS preflights.
* ``server``: ``{"m.server": PS_WELL_KNOWN_SERVER}`` (default ``<name>:443``, which is
  policyserv's fixed answer), for delegation of federation traffic.
* ``support`` (spec): contacts from ``PS_SUPPORT_ADMIN_CONTACTS`` (``m.role.admin``) and
  ``PS_SUPPORT_SECURITY_CONTACTS`` (``m.role.security``), and ``PS_SUPPORT_URL`` as
  ``support_page``; 404 ``M_NOT_FOUND`` when none is configured. With CORS, as
  policyserv does.

Every body is built once at start-up.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.matrix.errors import NotFound
from warden.runtime.identity import Identity
from warden.settings import Settings, support_contact
from warden_gateway.errors import error_response

POLICY_SERVER_PATH = "/.well-known/matrix/policy_server"
UNSTABLE_POLICY_SERVER_PATH = "/.well-known/matrix/org.matrix.msc4284.policy_server"
SERVER_PATH = "/.well-known/matrix/server"
SUPPORT_PATH = "/.well-known/matrix/support"

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization",
}


def support_document(settings: Settings) -> dict[str, Any] | None:
    """The support document, or None when nothing is configured."""
    contacts: list[dict[str, str]] = []
    for role, entries in (
        ("m.role.admin", settings.support_admin_contacts),
        ("m.role.security", settings.support_security_contacts),
    ):
        for entry in entries:
            contacts.append({**support_contact(entry), "role": role})
    doc: dict[str, Any] = {}
    if contacts:
        doc["contacts"] = contacts
    if settings.support_url:
        doc["support_page"] = settings.support_url
    return doc or None


class WellKnown:
    """Handlers for the well-known documents, with their bodies prepared."""

    def __init__(self, identity: Identity, settings: Settings) -> None:
        key = identity.policy_key_base64
        self._policy_server = orjson.dumps({"public_keys": {"ed25519": key}})
        self._unstable_policy_server = orjson.dumps({"public_key": key})
        m_server = settings.well_known_server or f"{identity.server_name}:443"
        self._server = orjson.dumps({"m.server": m_server})
        support = support_document(settings)
        self._support = orjson.dumps(support) if support is not None else None

    def routes(self) -> list[Route]:
        """The well-known routes."""
        return [
            Route(POLICY_SERVER_PATH, self.policy_server, methods=["GET", "OPTIONS"]),
            Route(
                UNSTABLE_POLICY_SERVER_PATH,
                self.unstable_policy_server,
                methods=["GET", "OPTIONS"],
            ),
            Route(SERVER_PATH, self.server, methods=["GET"]),
            Route(SUPPORT_PATH, self.support, methods=["GET", "OPTIONS"]),
        ]

    @staticmethod
    def _cors(request: Request, body: bytes) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=CORS_HEADERS)
        return Response(body, media_type="application/json", headers=CORS_HEADERS)

    async def policy_server(self, request: Request) -> Response:
        """``GET /.well-known/matrix/policy_server``."""
        return self._cors(request, self._policy_server)

    async def unstable_policy_server(self, request: Request) -> Response:
        """``GET /.well-known/matrix/org.matrix.msc4284.policy_server``."""
        return self._cors(request, self._unstable_policy_server)

    async def server(self, request: Request) -> Response:
        """``GET /.well-known/matrix/server``."""
        return Response(self._server, media_type="application/json")

    async def support(self, request: Request) -> Response:
        """``GET /.well-known/matrix/support``."""
        if self._support is None:
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=CORS_HEADERS)
            response = error_response(NotFound("No support information is configured"))
            response.headers.update(CORS_HEADERS)
            return response
        return self._cors(request, self._support)

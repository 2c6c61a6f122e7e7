"""Admin routes for trust sources: ``/api/v1/sources/muninn/set_member_directory_event``.

policyserv's route (reference §4.3): the body is a Muninn Hall bot event whose
``content["com.muninn-hall.member_directory"]`` maps server names to user IDs; only the
server names are stored (``warden.trust.muninn``), replacing the stored directory, and
the body is echoed. Differences: a malformed event, a key that is not a server name or
more than ``MAX_SERVERS`` servers is 400 ``M_BAD_JSON`` and nothing is stored. Workers
pick the new directory up within their reload interval (a minute).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from warden.matrix.errors import BadJSON, NotJSON
from warden.trust.muninn import InvalidDirectory, servers_from_event, store_servers

_EVENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A Muninn Hall bot event carrying the member directory.",
        "content": {
            "application/json": {
                "example": {
                    "type": "m.room.message",
                    "sender": "@muninn:maunium.net",
                    "content": {
                        "msgtype": "m.notice",
                        "body": "Member Directory - plaintext body not available",
                        "com.muninn-hall.member_directory": {"example.org": ["@admin:example.org"]},
                    },
                }
            }
        },
    }
}


def add_trust_source_routes(router: APIRouter, *, pool: asyncpg.Pool) -> None:
    """Add the trust-source routes to the admin router (its auth and limits apply)."""

    @router.post(
        "/sources/muninn/set_member_directory_event",
        summary="Set the Muninn Hall member directory",
        openapi_extra=_EVENT_BODY,
    )
    async def set_muninn_member_directory(request: Request) -> Response:
        """Store the servers of a Muninn Hall member directory event; echoes it."""
        raw = await request.body()
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise NotJSON("The body must be a JSON event") from None
        try:
            servers = servers_from_event(event)
        except InvalidDirectory as exc:
            raise BadJSON(str(exc)) from None
        await store_servers(pool, servers, source="admin_api")
        return Response(raw, media_type="application/json")

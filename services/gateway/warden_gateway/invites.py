"""Inbound invites of Warden's user: ``PUT /_matrix/federation/v2/invite/{roomId}/{eventId}``
and the v1 form (rooms of version 1 and 2 only; its body is the bare event and its
answer ``[200, {"event": ...}]``).

An invite is checked (X-Matrix, room version, PDU shape, content hash, room and event
ID, ``m.room.member`` invite of Warden's user, sender from the requesting server, the
required signatures), then accepted only for a room an operator pre-approved, first
match wins:

1. the room is in ``PS_INVITE_ALLOWED_ROOM_IDS``: it joins the ``default`` community;
2. the room was approved with ``POST /api/v1/rooms/{roomId}/approve_invite``: it joins
   the community named there;
3. the room is already protected (say Warden was kicked, or it was registered with
   ``PUT /api/v1/rooms/{roomId}``) for a community with ``can_self_join_rooms``: it
   rejoins that community.

Anything else is refused with 403 ``M_FORBIDDEN``: an invite is not consent, and a
policy server that joins every room it is invited to can be made to sign for anyone.

Accepting counter-signs the event with the federation key and answers it; Warden then
joins in the background (after a short delay, since the inviter answers its client
only once our answer is back), retrying with backoff. An invite names any room it
likes, so it never changes what Warden knows of a room:

* a room Warden is already joined to is not joined again: the invite is refused
  (403; a real homeserver never invites a joined user);
* for a known room (protected, or joined before), the invite's room version must be
  the recorded one (else 403, logged), and the join goes through the servers Warden
  knows for the room (those of its last join, servers with joined members), never
  through the inviter;
* only for a room Warden does not know yet does the join go through the inviter.

At most ``PS_INVITE_JOIN_MAX_PENDING`` background joins run at once (one per room):
past that an invite is answered 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.federation.membership import check_invite, countersign_invite
from warden.federation.xmatrix import VerifyKeySource, authenticate_headers
from warden.matrix.canonical_json import CanonicalJSONError, parse_canonical
from warden.matrix.errors import BadJSON, Forbidden, MatrixError, NotJSON, Unauthorized
from warden.runtime.identity import Identity
from warden.settings import Settings
from warden.storage import communities, room_state, rooms
from warden.storage import membership as membership_store
from warden.storage.database import DATABASE_ERRORS
from warden_gateway.client_address import client_address
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.request_body import read_limited_body
from warden_gateway.room_joins import BACKGROUND_JOINS, RoomJoiner, TooManyPendingJoins

logger = logging.getLogger(__name__)

INVITE_V2_PATH = "/_matrix/federation/v2/invite/{room_id}/{event_id:path}"
INVITE_V1_PATH = "/_matrix/federation/v1/invite/{room_id}/{event_id:path}"
# An invite carries the event and a few stripped (or, MSC4311, full) state events.
MAX_INVITE_BODY_BYTES = 1024 * 1024
# Known servers of a room to join through (besides those of the last join).
KNOWN_ROOM_SERVERS = 5
JOIN_BUSY_RETRY_SECONDS = 30

INVITES = Counter(
    "warden_invites_total",
    "Invites of Warden's user received over federation, by outcome: accepted, refused "
    "(not a pre-approved room, already joined, or a room version that is not the known "
    "room's), invalid (bad request or event), unauthorized, unavailable (a dependency "
    "failed, or too many joins pending).",
    ["outcome"],
)

_DEPENDENCY_ERRORS = DATABASE_ERRORS


def _request_target(request: Request) -> str:
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


class InviteAPI:
    """The invite routes and what deciding on an invite needs."""

    def __init__(
        self,
        *,
        identity: Identity,
        settings: Settings,
        keyring: VerifyKeySource,
        pool: asyncpg.Pool,
        joiner: RoomJoiner,
    ) -> None:
        self._identity = identity
        self._settings = settings
        self._keyring = keyring
        self._pool = pool
        self._joiner = joiner
        self._allowed = frozenset(settings.invite_allowed_room_ids)
        self.user_id = f"@{settings.join_localpart}:{identity.server_name}"

    def routes(self) -> list[Route]:
        """``PUT`` v2 and v1 invite routes."""
        return [
            Route(INVITE_V2_PATH, self.invite_v2, methods=["PUT"]),
            Route(INVITE_V1_PATH, self.invite_v1, methods=["PUT"]),
        ]

    async def invite_v2(self, request: Request) -> Response:
        """``PUT /_matrix/federation/v2/invite/{roomId}/{eventId}``."""
        return await self._answer(request, legacy=False)

    async def invite_v1(self, request: Request) -> Response:
        """``PUT /_matrix/federation/v1/invite/{roomId}/{eventId}``."""
        return await self._answer(request, legacy=True)

    async def _answer(self, request: Request, *, legacy: bool) -> Response:
        outcome = "invalid"
        try:
            signed = await self._decide(request, legacy=legacy)
            outcome = "accepted"
            return _json([200, {"event": signed}] if legacy else {"event": signed})
        except MatrixError as exc:
            if isinstance(exc, Unauthorized):
                outcome = "unauthorized"
            elif isinstance(exc, Forbidden):
                outcome = "refused"
            elif isinstance(exc, TemporarilyUnavailable):
                outcome = "unavailable"
            return error_response(exc)
        except _DEPENDENCY_ERRORS as exc:
            outcome = "unavailable"
            logger.warning("invite failed on a dependency", extra={"error": repr(exc)})
            return error_response(
                TemporarilyUnavailable("Temporarily unavailable; try again", retry_after_seconds=5)
            )
        finally:
            INVITES.labels(outcome).inc()

    async def _decide(self, request: Request, *, legacy: bool) -> dict[str, Any]:
        room_id = str(request.path_params["room_id"])
        event_id = str(request.path_params["event_id"])
        # Before the body is read (review H7): no read or parse for a request without a
        # usable X-Matrix header or from an origin whose key cannot be had.
        auth = await authenticate_headers(
            request.headers.getlist("authorization"),
            self._identity.server_name,
            self._keyring,
            requester=client_address(request),
        )
        raw = await read_limited_body(request, MAX_INVITE_BODY_BYTES)
        try:
            body = parse_canonical(raw)
        except CanonicalJSONError as exc:
            raise BadJSON(f"Request body is not valid Matrix JSON: {exc}") from None
        except ValueError:
            raise NotJSON("Request body is not JSON") from None
        if not isinstance(body, dict):
            raise NotJSON("Request body must be a JSON object")
        origin = auth.verify_content(request.method, _request_target(request), body)
        if legacy:
            # v1 is only for rooms of version 1 and 2, which hash and sign alike.
            room_version_id: object = "1"
            event: object = body
        else:
            room_version_id = body.get("room_version")
            event = body.get("event")
            if not isinstance(event, dict):
                raise BadJSON("'event' must be the invite event (an object)")
        room_version, pdu = await check_invite(
            room_version_id=room_version_id,
            event=event,
            room_id=room_id,
            event_id=event_id,
            origin=origin,
            our_user_id=self.user_id,
            keyring=self._keyring,
        )
        community_id = await self.community_for(room_id)
        if community_id is None:
            logger.info(
                "invite refused: room not pre-approved",
                extra={"room_id": room_id, "origin": origin, "sender": pdu["sender"]},
            )
            raise Forbidden(
                "This policy server joins only rooms its operator approved; ask them to "
                "approve this room first"
            )
        via = await self._join_via(room_id, room_version.identifier, origin)
        if not self._joiner.can_join_in_background(room_id):
            BACKGROUND_JOINS.labels("refused").inc()
            raise TemporarilyUnavailable(
                "Too many joins in progress; retry later",
                retry_after_seconds=JOIN_BUSY_RETRY_SECONDS,
            )
        signed = countersign_invite(
            room_version,
            pdu,
            server_name=self._identity.server_name,
            signing_key=self._identity.federation_key,
            key_id=self._identity.federation_key_id,
        )
        logger.info(
            "invite accepted; joining",
            extra={"room_id": room_id, "origin": origin, "community_id": community_id},
        )
        try:
            self._joiner.join_in_background(room_id, community_id, via)
        except TooManyPendingJoins:
            raise TemporarilyUnavailable(
                "Too many joins in progress; retry later",
                retry_after_seconds=JOIN_BUSY_RETRY_SECONDS,
            ) from None
        return signed

    async def _join_via(self, room_id: str, invite_version: str, origin: str) -> list[str]:
        """The servers to join an invited room through; refuses (403) an invite to a
        room Warden is joined to, or naming another version than a known room's."""
        room = await rooms.get_room(self._pool, room_id)
        joined = await membership_store.get_membership(self._pool, room_id)
        recorded = room.room_version if room else joined.room_version if joined else None
        if recorded is None:
            return [origin]  # a room Warden does not know yet: only the inviter knows it
        if recorded != invite_version:
            logger.error(
                "invite refused: it names another version than the room's recorded one",
                extra={
                    "room_id": room_id,
                    "origin": origin,
                    "recorded": recorded,
                    "invite": invite_version,
                },
            )
            raise Forbidden(
                f"This room's version is {recorded}, not {invite_version}; invite refused"
            )
        state = await room_state.get_membership_state(self._pool, room_id)
        removed = state is not None and state.membership in ("leave", "ban")
        if room is not None and joined is not None and joined.membership == "join" and not removed:
            logger.info(
                "invite refused: already joined", extra={"room_id": room_id, "origin": origin}
            )
            raise Forbidden("The policy server is already in this room")
        known = list(joined.servers) if joined else []
        for server in await room_state.joined_servers(self._pool, room_id, KNOWN_ROOM_SERVERS):
            if server not in known:
                known.append(server)
        return [s for s in known if s != self._identity.server_name]

    async def community_for(self, room_id: str) -> str | None:
        """The community an invite to ``room_id`` joins, or None to refuse it."""
        if room_id in self._allowed:
            return "default"
        approval = await membership_store.get_invite_approval(self._pool, room_id)
        if approval is not None:
            return approval.community_id
        room = await rooms.get_room(self._pool, room_id)
        if room is not None:
            community = await communities.get_community(self._pool, room.community_id)
            if community is not None and community.can_self_join_rooms:
                return community.community_id
        return None

"""The server-centric API (policyserv's ``/_policyserv/v1``), on the federation listener.

A homeserver or tool holding a community's access token (``Authorization: Bearer
pst_…``, see ``community_auth``) may:

- ``POST /_policyserv/v1/check/text``: the raw body is the text (at most
  ``PS_CHECK_TEXT_MAX_BYTES``, UTF-8). The community's text-capable filters judge it on
  a filter worker (``CHECK_TEXT_SUBJECT``). Allowed: 200 ``{}``. Refused: 400
  ``ORG.MATRIX.MSC4387_SAFETY`` with ``harms`` and ``org.matrix.msc4387.harms``. No
  worker answer within ``PS_CHECK_TEXT_TIMEOUT_SECONDS``: 503. Nothing is stored.
- ``POST /_policyserv/v1/join/{roomId}``: when the community has
  ``can_self_join_rooms``, Warden joins the room through ``PS_JOIN_SERVER`` (the admin
  API's join, ``RoomJoiner.join``) and protects it for the community; the answer is the
  room. A room protected for another community is refused (403 ``M_FORBIDDEN``); one of
  the caller's own community is joined again (after a kick, say), where policyserv
  answers 400 ``M_BAD_STATE``.

Every failure is a Matrix error. The routes are plain Starlette routes.
"""

from __future__ import annotations

import logging

import asyncpg
import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.bus.request_reply import Requester
from warden.bus.subjects import CHECK_TEXT_SUBJECT, HEADER_COMMUNITY
from warden.matrix.errors import Forbidden, InvalidParam, MatrixError
from warden.policy.harms import HARMS_FIELD
from warden.storage import rooms
from warden_gateway.community_auth import CommunityAuth
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.request_body import read_limited_body
from warden_gateway.room_joins import RoomJoiner

logger = logging.getLogger(__name__)

PREFIX = "/_policyserv/v1"
CHECK_TEXT_PATH = PREFIX + "/check/text"
JOIN_PATH = PREFIX + "/join/{room_id}"
SAFETY_ERRCODE = "ORG.MATRIX.MSC4387_SAFETY"
REFUSED_TEXT = "Text is probably spammy"

SERVER_CENTRIC_REQUESTS = Counter(
    "warden_server_centric_requests_total",
    "Server-centric API (/_policyserv/v1) requests, by endpoint and outcome (ok, refused: "
    "the text was judged spam, or an error's errcode).",
    ["endpoint", "outcome"],
)

_EMPTY = b"{}"


class SafetyRefusal(MatrixError):
    """400 ``ORG.MATRIX.MSC4387_SAFETY``: the text is refused, for ``harms``."""

    errcode = SAFETY_ERRCODE
    status = 400


class ServerCentricAPI:
    """The ``/_policyserv/v1`` routes. ``joiner`` None leaves out the join route."""

    def __init__(
        self,
        *,
        auth: CommunityAuth,
        nats: NATS,
        pool: asyncpg.Pool,
        joiner: RoomJoiner | None,
        max_text_bytes: int,
        text_timeout_seconds: float,
        text_subject: str = CHECK_TEXT_SUBJECT,
    ) -> None:
        self.auth = auth
        self._requests = Requester(nats)
        self._pool = pool
        self._joiner = joiner
        self._max_text_bytes = max_text_bytes
        self._timeout = text_timeout_seconds
        self._subject = text_subject

    def routes(self) -> list[Route]:
        """The routes to add to the federation-facing app."""
        out = [Route(CHECK_TEXT_PATH, self.check_text, methods=["POST"])]
        if self._joiner is not None:
            out.append(Route(JOIN_PATH, self.join, methods=["POST"]))
        return out

    async def check_text(self, request: Request) -> Response:
        """``POST /_policyserv/v1/check/text``."""
        try:
            community = await self.auth.authenticate(request)
            body = await read_limited_body(request, self._max_text_bytes)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidParam("The text must be UTF-8") from None
            harms = await self._ask_worker(community.community_id, body)
            if harms:
                raise SafetyRefusal(REFUSED_TEXT, harms=harms, **{HARMS_FIELD: harms})
        except MatrixError as exc:
            SERVER_CENTRIC_REQUESTS.labels(
                "check_text", "refused" if isinstance(exc, SafetyRefusal) else exc.errcode
            ).inc()
            return error_response(exc)
        SERVER_CENTRIC_REQUESTS.labels("check_text", "ok").inc()
        return Response(_EMPTY, media_type="application/json")

    async def _ask_worker(self, community_id: str, text: bytes) -> list[str]:
        try:
            reply = await self._requests.request(
                self._subject,
                text,
                timeout_seconds=self._timeout,
                headers={HEADER_COMMUNITY: community_id},
            )
        except (NatsTimeoutError, NoRespondersError):
            raise TemporarilyUnavailable("No filter worker judged the text in time") from None
        except NatsError as exc:
            logger.warning("text check request failed", extra={"error": repr(exc)})
            raise TemporarilyUnavailable("The filter workers cannot be reached") from None
        try:
            answer = orjson.loads(reply.data)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("harms"), list):
            error = answer.get("error") if isinstance(answer, dict) else None
            logger.warning("text check not answered", extra={"error": str(error)[:200]})
            raise TemporarilyUnavailable("The text could not be judged; retry")
        return [h for h in answer["harms"] if isinstance(h, str)]

    async def join(self, request: Request) -> Response:
        """``POST /_policyserv/v1/join/{roomId}``."""
        from warden_gateway.admin_api import _check_any_room_id, join_or_raise

        try:
            community = await self.auth.authenticate(request)
            if not community.can_self_join_rooms:
                raise Forbidden("This community may not join rooms itself")
            room_id = str(request.path_params["room_id"])
            _check_any_room_id(room_id)
            known = await rooms.get_room(self._pool, room_id)
            if known is not None and known.community_id != community.community_id:
                raise Forbidden("The room is protected for another community")
            assert self._joiner is not None
            outcome = await join_or_raise(self._joiner, room_id, community.community_id)
        except MatrixError as exc:
            SERVER_CENTRIC_REQUESTS.labels("join", exc.errcode).inc()
            return error_response(exc)
        SERVER_CENTRIC_REQUESTS.labels("join", "ok").inc()
        logger.info(
            "community joined a room",
            extra={"community_id": community.community_id, "room_id": room_id},
        )
        return Response(orjson.dumps(outcome.room.to_api()), media_type="application/json")

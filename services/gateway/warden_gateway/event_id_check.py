"""``POST /_policyserv/v1/check/event_id``: a community asks what Warden thinks of an
event it names by ID (the reference's server-centric API).

Body ``{"event_id": "$..."}``, ``Authorization: Bearer <community access token>``.
In order:

1. the caller's community (``authenticate``: 401 ``M_MISSING_TOKEN`` /
   ``M_UNKNOWN_TOKEN``, 429 past the token's rate limit);
2. the body: at most ``MAX_BODY_BYTES`` (413 ``M_TOO_LARGE``), JSON (400
   ``M_NOT_JSON``), an object whose ``event_id`` is an event ID (400 ``M_BAD_JSON``);
3. a stored verdict (PostgreSQL, first writer wins, imported ones included) is the
   answer, without fetching anything (except an imported room v1/v2 refusal not yet
   bound to content: step 4 fetches the event, and the worker binds the refusal to it);
4. else the event is fetched from ``PS_EVENT_FETCH_SERVERS`` and verified
   (``warden.federation.event_fetch``) and judged by the filter workers exactly as
   ``/sign`` has it judged (``VerdictSource``, the same evaluation request); the server
   that served the verified copy is the request's origin.

Only events of rooms of the caller's community are answered: policyserv judges an
event of any protected room with that room's community's filters, which lets one
community learn about another's rooms and verdicts. Here an event of another
community's room, or of a room Warden does not protect, is 404 ``M_NOT_FOUND`` with the
same message either way, so the answer does not tell which rooms others protect.

Answers, as the reference: allowed 200 ``{}``; refused 400 ``M_FORBIDDEN`` with the harm
IDs in ``harms`` and ``org.matrix.msc4387.harms``. No verified copy: 404 ``M_NOT_FOUND``
(no server has it, or no served copy verified: forged, unsigned, altered); a server
that could not be reached in time: 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from warden.bus.evaluation import EvaluationRequest
from warden.federation.event_fetch import (
    EventFetcher,
    EventFetchUnavailable,
    EventInOtherRoom,
    EventNotFound,
    EventUnverifiable,
    FetchedEvent,
)
from warden.matrix.errors import BadJSON, MatrixError, NotFound, NotJSON
from warden.matrix.pdu import MAX_ID_LENGTH
from warden.policy.harms import HARMS_FIELD
from warden.storage.database import DATABASE_ERRORS
from warden.storage.records import Community, Room
from warden.storage.verdicts import get_verdict
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.policy_api import Refused, RoomLookup
from warden_gateway.request_body import read_limited_body
from warden_gateway.verdict_source import VerdictSource

logger = logging.getLogger(__name__)

CHECK_EVENT_ID_PATH = "/_policyserv/v1/check/event_id"

# {"event_id": <at most 255 bytes>} with room to spare; anything larger is not a request.
MAX_BODY_BYTES = 4096
RETRY_AFTER_SECONDS = 5

REFUSED_MESSAGE = "This event is not allowed by the community's policy"
NOT_YOURS_MESSAGE = "This event is not in a room of your community"

# The caller's community from the request, or a MatrixError (401, 429).
Authenticate = Callable[[Request], Awaitable[Community]]

EVENT_ID_CHECKS = Counter(
    "warden_event_id_checks_total",
    "POST /_policyserv/v1/check/event_id requests, by where the verdict came from "
    "(stored, fetched, none) and outcome (allowed, refused, or the error's errcode).",
    ["source", "outcome"],
)
EVENT_ID_CHECK_SECONDS = Histogram(
    "warden_event_id_check_seconds",
    "Time to answer POST /_policyserv/v1/check/event_id.",
)

# C0, DEL and C1 controls and whitespace: an event ID becomes a NATS header, a Redis
# key and a URL path segment (as warden.matrix.pdu.event_id_problem).
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x1f\x7f-\x9f\s]")

# Failures of our own dependencies: 503, never the caller's fault.
_DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, RedisError)


def parse_event_id(body: bytes) -> str:
    """The ``event_id`` of a request body; raises ``NotJSON`` or ``BadJSON``."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotJSON("Request body is not JSON") from None
    if not isinstance(value, dict):
        raise BadJSON('Request body must be a JSON object: {"event_id": "$..."}')
    event_id = value.get("event_id")
    if not isinstance(event_id, str):
        raise BadJSON("'event_id' must be a string")
    if (
        len(event_id) < 2
        or not event_id.startswith("$")
        or len(event_id.encode("utf-8")) > MAX_ID_LENGTH
        or _CONTROL_OR_SPACE.search(event_id)
    ):
        raise BadJSON(
            f"'event_id' must be an event ID: '$' and at most {MAX_ID_LENGTH} bytes "
            "without whitespace or control characters"
        )
    return event_id


class EventIdCheck:
    """The ``check/event_id`` handler and what it needs."""

    def __init__(
        self,
        *,
        authenticate: Authenticate,
        pool: asyncpg.Pool,
        rooms: RoomLookup,
        verdicts: VerdictSource,
        fetcher: EventFetcher | None,
    ) -> None:
        self._authenticate = authenticate
        self._pool = pool
        self._rooms = rooms
        self._verdicts = verdicts
        self._fetcher = fetcher

    def routes(self) -> list[Route]:
        """The route (POST only: another method is 405 ``M_UNRECOGNIZED``)."""
        return [Route(CHECK_EVENT_ID_PATH, self.handle, methods=["POST"])]

    async def handle(self, request: Request) -> Response:
        """``POST /_policyserv/v1/check/event_id``."""
        start = time.perf_counter()
        source = "none"
        outcome = "M_UNKNOWN"
        try:
            community = await self._authenticate(request)
            event_id = parse_event_id(await read_limited_body(request, MAX_BODY_BYTES))
            stored = await get_verdict(self._pool, event_id)
            # An unbound verdict (a room v1/v2 refusal imported from policyserv) names no
            # content or room yet: the event is fetched, and judging it binds it.
            if stored is not None and stored.reference_hash:
                if not await self._stored_is_ours(stored.room_id, stored.community_id, community):
                    raise NotFound(NOT_YOURS_MESSAGE)
                source = "stored"
                prohibited, harms = stored.prohibited, tuple(stored.harms)
            else:
                fetched, room = await self._fetch(event_id, community)
                source = "fetched"
                prohibited, harms = await self._judge(fetched, room)
            if prohibited:
                outcome = "refused"
                logger.info(
                    "check/event_id: refused",
                    extra={
                        "event_id": event_id,
                        "community_id": community.community_id,
                        "source": source,
                        "harms": list(harms),
                    },
                )
                return error_response(
                    Refused(REFUSED_MESSAGE, harms=list(harms), **{HARMS_FIELD: list(harms)})
                )
            outcome = "allowed"
            return Response(b"{}", media_type="application/json")
        except MatrixError as exc:
            outcome = exc.errcode
            return error_response(exc)
        except _DEPENDENCY_ERRORS as exc:
            outcome = "unavailable"
            logger.warning(
                "check/event_id failed on a dependency",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            return error_response(
                TemporarilyUnavailable(
                    "The policy server is temporarily unavailable; try again later",
                    retry_after_seconds=RETRY_AFTER_SECONDS,
                )
            )
        finally:
            EVENT_ID_CHECKS.labels(source, outcome).inc()
            EVENT_ID_CHECK_SECONDS.observe(time.perf_counter() - start)

    async def _stored_is_ours(
        self, room_id: str, verdict_community: str, community: Community
    ) -> bool:
        """Whether a stored verdict's event is in a room of ``community``: the room's
        current community, or the verdict's when the room is no longer protected."""
        room = await self._rooms.get(room_id) if room_id else None
        owner = room.community_id if room is not None else verdict_community
        return owner == community.community_id

    async def _fetch(self, event_id: str, community: Community) -> tuple[FetchedEvent, Room]:
        if self._fetcher is None or not self._fetcher.servers:
            raise NotFound(
                "No verdict is stored for this event, and this policy server fetches "
                "events from no server (PS_EVENT_FETCH_SERVERS is empty)"
            )
        ours: dict[str, Room] = {}

        async def room_version_for(room_id: str) -> str | None:
            room = await self._rooms.get(room_id)
            if room is None or room.community_id != community.community_id:
                return None
            ours[room_id] = room
            return room.room_version

        try:
            fetched = await self._fetcher.fetch(event_id, room_version_for)
        except EventInOtherRoom:
            raise NotFound(NOT_YOURS_MESSAGE) from None
        except EventUnverifiable:
            raise NotFound(
                "No copy of this event that the servers served verified (content hash, "
                "event ID or signatures): it is not judged"
            ) from None
        except EventNotFound:
            raise NotFound("No verdict is stored for this event and no server has it") from None
        except EventFetchUnavailable:
            raise TemporarilyUnavailable(
                "The event could not be fetched over federation right now; try again later",
                retry_after_seconds=RETRY_AFTER_SECONDS,
            ) from None
        return fetched, ours[fetched.room_id]

    async def _judge(self, fetched: FetchedEvent, room: Room) -> tuple[bool, tuple[str, ...]]:
        """The filter workers' verdict, asked for as ``/sign`` asks (prohibited, harms)."""
        pdu = fetched.pdu
        if pdu.get("type") == "m.room.policy" and pdu.get("state_key") == "":
            return False, ()  # as /sign: a room must always be able to change its policy
        entry = await self._verdicts.get(
            EvaluationRequest(
                event_id=fetched.event_id,
                reference_hash=fetched.reference_hash,
                room_version=fetched.room_version,
                community_id=room.community_id,
                origin=fetched.served_by,
                source="check_event_id",
                pdu=fetched.canonical,
                sender_signed=fetched.sender_signed,
            )
        )
        if entry.reference_hash != fetched.reference_hash:
            # A room v1/v2 event ID judged before for other content: never "allowed".
            return True, ()
        return entry.prohibited, entry.harms

"""The admin API (``/api/v1``): communities, protected rooms, moderators and verdicts.

Paths and bodies are policyserv's (reference §4.3), so its tooling keeps working; the
app includes this router only when ``PS_API_KEY`` is set. Differences from policyserv:

- the key is compared in constant time;
- every community config write is validated (unknown keys, instance-only keys and wrong
  types are refused with 400 ``M_BAD_JSON`` naming the key) and announced on NATS
  (``CONFIG_CHANGED_SUBJECT``) once committed, so workers drop their cached copy;
- ``PATCH /communities/{id}`` merges ``config`` as a JSON merge patch (``null`` removes
  an override) instead of silently keeping keys;
- ``PUT``/``DELETE /rooms/{room_id}`` protect, move and unprotect rooms directly;
- ``GET /events/{event_id}`` shows a stored verdict with every filter's outcome;
- ``GET /rooms`` answers ``[]``, not ``null``, when no room is protected;
- ``POST /rooms/{room_id}/join`` joins over federation (``via``, default
  ``PS_JOIN_SERVER``) and protects the room, also when it is already known: rejoining
  after a kick works, and a join naming another community moves the room;
  ``POST /rooms/{room_id}/leave`` leaves and stops protecting it;
- ``POST``/``DELETE /rooms/{room_id}/approve_invite`` pre-approve invites to a room;
- community access tokens are stored only as a hash: ``rotate_access_token`` shows the
  new one once and cannot show the old one (``old_access_token`` is ``""``);
- ``DELETE /communities/{id}`` deletes a community without rooms, or moving its rooms
  (``?move_rooms_to=<community_id>``).

Request validation errors become Matrix errors here (in the route class), not in an
app-wide handler, and the key is checked before the body is even read. Failed
authentications are throttled per client address (``admin_auth``, 429 past
``PS_ADMIN_AUTH_FAILURES_PER_MINUTE``). ``PS_ADMIN_HTTP_BIND`` serves this API on a
listener of its own (``app.build_admin_app``) instead of next to federation.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Path
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from prometheus_client import Counter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive

from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.federation.membership import MembershipFailed
from warden.federation.xmatrix import is_valid_server_name
from warden.matrix.errors import (
    BadJSON,
    BadState,
    InvalidParam,
    MatrixError,
    NotFound,
    NotJSON,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedRoomVersion,
)
from warden.matrix.room_versions import RoomVersion, get_room_version
from warden.policy.config import (
    ConfigError,
    instance_defaults,
    known_keys,
    legacy_key_warnings,
    validate_community_config,
)
from warden.storage import communities, community_tokens, room_state, rooms, verdicts
from warden.storage import membership as membership_store
from warden.storage import records as storage_records
from warden.telemetry.tracing import inject_headers
from warden_gateway.admin_auth import AdminAuthThrottle
from warden_gateway.admin_models import (
    ApproveInviteRequest,
    Community,
    CommunityPatch,
    CommunityWriteAnswer,
    ConfigBody,
    DeletedCommunity,
    EmptyBody,
    InviteApproval,
    JoinRoomRequest,
    LeaveRoomRequest,
    MatrixErrorBody,
    NewCommunityRequest,
    ProtectRoomRequest,
    Room,
    RoomDetail,
    RotatedAccessToken,
    SetRoomModeratorRequest,
    Verdict,
)
from warden_gateway.client_address import client_address
from warden_gateway.errors import on_matrix_error
from warden_gateway.keyword_templates_api import add_keyword_template_routes
from warden_gateway.room_joins import JoinOutcome, NotificationFailed, RoomJoiner
from warden_gateway.trust_sources_api import add_trust_source_routes

logger = logging.getLogger(__name__)

ADMIN_PREFIX = "/api/v1"
# Generous for keyword lists in a config, small enough that a request cannot eat memory.
MAX_BODY_BYTES = 1024 * 1024
# How long to wait for NATS to confirm a config-change notification.
NOTIFY_TIMEOUT_SECONDS = 5
# Matrix identifiers are at most 255 bytes (spec, "Identifier grammar").
_MAX_ID_BYTES = 255
# Room version 12 room IDs: "!" + URL-safe unpadded base64 of a sha256 (MSC4291).
_HASH_ROOM_ID_RE = re.compile(r"![A-Za-z0-9_-]{43}")

CONFIG_NOTIFICATIONS = Counter(
    "warden_admin_config_notifications_total",
    "Config-change notifications the admin API sent to workers over NATS, by outcome.",
    ["outcome"],
)

# Declaring "4XX" also keeps FastAPI from documenting its 422 body, which this API never
# sends (validation errors are 400 Matrix errors).
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": MatrixErrorBody, "description": "Invalid request (M_BAD_JSON, M_NOT_JSON…)"},
    401: {"model": MatrixErrorBody, "description": "Missing or wrong API key (M_UNAUTHORIZED)"},
    404: {"model": MatrixErrorBody, "description": "Not found (M_NOT_FOUND)"},
    "4XX": {
        "model": MatrixErrorBody,
        "description": "Other client errors: body over 1 MiB (413 M_TOO_LARGE), wrong "
        "method (405 M_UNRECOGNIZED)",
    },
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    503: {
        "model": MatrixErrorBody,
        "description": "Saved, but workers could not be notified: repeat the request",
    },
}

_JOIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **_WRITE_ERRORS,
    502: {
        "model": MatrixErrorBody,
        "description": "No server completed the join or leave (M_UNKNOWN; `reasons` maps "
        "each server tried to its failure)",
    },
    503: {
        "model": MatrixErrorBody,
        "description": "Every server failed temporarily (M_UNKNOWN with `reasons`; retry "
        "later), or the change was saved but not announced (repeat the request)",
    },
}

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class BadGateway(MatrixError):
    """502 ``M_UNKNOWN``: the servers Warden asked refused or failed."""

    errcode = "M_UNKNOWN"
    status = 502


def membership_error(exc: MembershipFailed) -> MatrixError:
    """The admin API's answer when no server completed a join or leave."""
    if exc.unsupported_version is not None:
        return UnsupportedRoomVersion(
            f"Room version {exc.unsupported_version!r} is not supported by Warden",
            reasons=exc.reasons,
        )
    message = str(exc)
    if not exc.reasons:
        return BadJSON("via: no valid server to ask (and PS_JOIN_SERVER is Warden itself)")
    if exc.temporary:
        return Unavailable(message, reasons=exc.reasons)
    return BadGateway(message, reasons=exc.reasons)


async def join_or_raise(
    joiner: RoomJoiner, room_id: str, community_id: str, via: Sequence[str] | None = None
) -> JoinOutcome:
    """Join (or join again) and protect the room; failures as the admin API answers them."""
    try:
        return await joiner.join(room_id, community_id, via)
    except MembershipFailed as exc:
        raise membership_error(exc) from None
    except NotificationFailed:
        raise Unavailable(
            "Joined and saved, but the gateways could not be notified; repeat the request"
        ) from None


def _check_any_room_id(room_id: str) -> None:
    """A room ID of any version: ``!opaque:server`` or (v12) ``!`` + 43 base64 characters."""
    if len(room_id.encode()) > _MAX_ID_BYTES:
        raise InvalidParam(f"room_id: longer than {_MAX_ID_BYTES} bytes")
    if _HASH_ROOM_ID_RE.fullmatch(room_id):
        return
    opaque, sep, server = room_id.removeprefix("!").partition(":")
    if not room_id.startswith("!") or not sep or not opaque or not is_valid_server_name(server):
        raise InvalidParam(
            "room_id: must be !opaque:server.name, or for room version 12 '!' followed by "
            "43 URL-safe base64 characters"
        )


def matrix_error_for_validation(exc: RequestValidationError) -> MatrixError:
    """Turn FastAPI's validation error into a Matrix error naming the offending field."""
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    message = str(first.get("msg", "invalid"))
    if loc[:1] == ("body",):
        if kind == "json_invalid":
            return NotJSON("Request body is not valid JSON")
        if len(loc) == 1:
            if kind == "missing":
                return NotJSON("Request body is required and must be a JSON object")
            if isinstance(first.get("input"), bytes):
                # FastAPI parses JSON only when the Content-Type says so.
                return NotJSON("Request body must be JSON sent with Content-Type: application/json")
            return BadJSON("Request body must be a JSON object")
        field = ".".join(str(part) for part in loc[1:])
        return BadJSON(f"{field}: {message}")
    field = ".".join(str(part) for part in loc[1:]) or "request"
    return InvalidParam(f"{field}: {message}")


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return await on_matrix_error(request, matrix_error_for_validation(exc))


def install_admin_error_handlers(app: FastAPI) -> None:
    """Register the app-level handler for FastAPI validation errors (400 Matrix errors).

    The admin routes already convert their own validation errors; this covers any other
    FastAPI route of the app, so no request ever gets FastAPI's default 422 body. The
    gateway's MatrixError/HTTPException/Exception handlers must be registered too.
    """
    app.add_exception_handler(RequestValidationError, _on_validation_error)


def _authenticate(request: Request, api_key: bytes) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Starlette decodes header bytes as latin-1: encode back to compare the raw bytes.
    # compare_digest's time depends only on the length of the (untrusted) token.
    presented = token.strip().encode("latin-1", errors="replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented, api_key):
        raise Unauthorized("Missing or wrong API key (Authorization: Bearer <PS_API_KEY>)")


def _limited_receive(receive: Receive, limit: int) -> Receive:
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge(f"Request body is larger than {limit} bytes")
        return message

    return limited


def _admin_route_class(api_key: bytes, throttle: AdminAuthThrottle) -> type[APIRoute]:
    """A route class that authenticates first, bounds the body and speaks Matrix errors."""

    class AdminRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def admin_handler(request: Request) -> Response:
                # Before anything reads the body: unauthenticated callers learn nothing.
                client = client_address(request)
                throttle.check(client)
                try:
                    _authenticate(request, api_key)
                except Unauthorized:
                    throttle.failed(client)
                    raise
                length = request.headers.get("content-length", "")
                if length.isdigit() and int(length) > MAX_BODY_BYTES:
                    raise TooLarge(f"Request body is larger than {MAX_BODY_BYTES} bytes")
                bounded = Request(request.scope, _limited_receive(request.receive, MAX_BODY_BYTES))
                try:
                    return await handler(bounded)
                except RequestValidationError as exc:
                    raise matrix_error_for_validation(exc) from None
                except HTTPException as exc:
                    # FastAPI wraps anything raised while reading or decoding the body
                    # (our TooLarge, invalid UTF-8) in a 400 HTTPException.
                    if isinstance(exc.__cause__, MatrixError):
                        raise exc.__cause__ from None
                    if exc.status_code == 400:
                        raise NotJSON("Request body is not valid JSON") from None
                    raise

            return admin_handler

    return AdminRoute


def _community(community: storage_records.Community) -> Community:
    return Community.model_validate(community.to_api())


def _written(community: storage_records.Community, config: dict[str, Any]) -> Community:
    """The answer to a config write: the community, plus warnings about ignored keys."""
    warnings = legacy_key_warnings(config)
    if not warnings:
        return _community(community)
    return CommunityWriteAnswer.model_validate({**community.to_api(), "warnings": warnings})


def _room(room: storage_records.Room) -> Room:
    return Room.model_validate(room.to_api())


def _checked_config(data: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    try:
        return validate_community_config(data)
    except ConfigError as exc:
        raise BadJSON(f"{prefix}{exc.key}: {exc.message}") from None


def _check_room_id(room_id: str, version: RoomVersion) -> None:
    if len(room_id.encode()) > _MAX_ID_BYTES:
        raise InvalidParam(f"room_id: longer than {_MAX_ID_BYTES} bytes")
    if version.room_ids_as_hashes:
        if not _HASH_ROOM_ID_RE.fullmatch(room_id):
            raise InvalidParam(
                f"room_id: room version {version.identifier} room IDs are '!' followed by "
                "the create event's reference hash (43 characters, no server part)"
            )
        return
    opaque, sep, server = room_id.removeprefix("!").partition(":")
    if not room_id.startswith("!") or not sep or not opaque or not is_valid_server_name(server):
        raise InvalidParam(
            f"room_id: room version {version.identifier} room IDs look like !opaque:server.name"
        )


def _check_user_id(user_id: str) -> None:
    localpart, sep, server = user_id.removeprefix("@").partition(":")
    if (
        not user_id.startswith("@")
        or not sep
        or not localpart
        or not is_valid_server_name(server)
        or len(user_id.encode()) > _MAX_ID_BYTES
    ):
        raise BadJSON('moderator_user_id: must be a user ID like @mod:example.org, or "" to unset')


def build_admin_router(
    *,
    api_key: str,
    pool: asyncpg.Pool,
    nats: NATS,
    joiner: RoomJoiner | None = None,
    server_name: str = "",
    policy_public_key: str = "",
    auth_failures_per_minute: int = 10,
) -> APIRouter:
    """The ``/api/v1`` router; every route requires ``Authorization: Bearer <api_key>``.

    ``auth_failures_per_minute`` failed authentications from one client address make
    it wait out the minute (429, ``PS_ADMIN_AUTH_FAILURES_PER_MINUTE``).

    ``server_name`` and ``policy_public_key`` (ours) tell ``GET /rooms/{room_id}``
    whether the room's learned ``m.room.policy`` names Warden with its current key.

    ``joiner`` enables ``/rooms/{room_id}/join`` and ``/leave`` (the gateway always
    passes one; without it those paths answer 404).

    The instance defaults shown by ``/instance/community_config`` are read from the
    environment here, once (as the workers do at start): a bad ``PS_*`` value raises
    ``ConfigError`` and should stop the service. The app must also call
    ``install_admin_error_handlers`` and register the gateway's Matrix error handlers.
    """
    if not api_key:
        raise ValueError("the admin API needs a non-empty API key")
    keys = known_keys()
    community_defaults = {
        name: value for name, value in instance_defaults().items() if not keys[name].instance_only
    }

    router = APIRouter(
        prefix=ADMIN_PREFIX,
        route_class=_admin_route_class(
            api_key.encode(), AdminAuthThrottle(auth_failures_per_minute)
        ),
        # Documents the scheme in the OpenAPI document; the check itself is done by the
        # route class, before the body is read.
        dependencies=[Depends(HTTPBearer(auto_error=False, scheme_name="PS_API_KEY"))],
        responses=_ERRORS,
        tags=["admin"],
        # A body without Content-Type is parsed as JSON (curl and scripts often omit
        # it); one declared as something else is refused with M_NOT_JSON.
        strict_content_type=False,
    )

    async def notify(change: dict[str, str]) -> None:
        """Tell every worker a community's config or a room changed (after the commit)."""
        try:
            await nats.publish(
                CONFIG_CHANGED_SUBJECT, orjson.dumps(change), headers=inject_headers() or None
            )
            await nats.flush(timeout=NOTIFY_TIMEOUT_SECONDS)
        except (NatsError, TimeoutError) as exc:
            CONFIG_NOTIFICATIONS.labels("failed").inc()
            logger.warning(
                "config change saved but not announced",
                extra={"change": change, "error": repr(exc)},
            )
            raise Unavailable(
                "The change was saved, but the workers could not be notified; repeat the request"
            ) from None
        CONFIG_NOTIFICATIONS.labels("sent").inc()

    # --- Communities ---------------------------------------------------------------

    @router.post("/communities/new", summary="Create a community")
    async def create_community(body: NewCommunityRequest) -> Community:
        """Create a community with an empty config (it inherits every instance default)."""
        return _community(await communities.create_community(pool, body.name))

    @router.get("/communities", summary="List communities")
    async def list_communities() -> list[Community]:
        """Every community, ordered by ID, with its config overrides (``[]`` if none)."""
        return [_community(c) for c in await communities.list_communities(pool)]

    @router.get("/communities/{community_id}", summary="Get a community")
    async def get_community(community_id: str) -> Community:
        """The community and its stored config overrides."""
        community = await communities.get_community(pool, community_id)
        if community is None:
            raise NotFound("Unknown community")
        return _community(community)

    @router.patch(
        "/communities/{community_id}",
        summary="Change a community",
        responses=_WRITE_ERRORS,
        response_model=CommunityWriteAnswer,
        response_model_exclude_none=True,
    )
    async def patch_community(community_id: str, body: CommunityPatch) -> Community:
        """Change the given fields; ``config`` is merged key by key (``null`` removes a key)."""
        for field in body.model_fields_set:
            if getattr(body, field) is None:
                raise BadJSON(f"{field}: must not be null")
        config_set: dict[str, Any] | None = None
        config_unset: list[str] = []
        if body.config is not None:
            config_set = _checked_config(
                {k: v for k, v in body.config.items() if v is not None}, prefix="config."
            )
            # Removing any key is allowed, so overrides left by an older version or by
            # policyserv can be cleaned up.
            config_unset = [k for k, v in body.config.items() if v is None]
        community = await communities.patch_community(
            pool,
            community_id,
            name=body.name,
            config_set=config_set,
            config_unset=config_unset,
            can_self_join_rooms=body.can_self_join_rooms,
        )
        if community is None:
            raise NotFound("Unknown community")
        if body.model_fields_set:
            await notify({"community_id": community_id})
        return _written(community, body.config or {})

    @router.post(
        "/communities/{community_id}/config",
        summary="Replace a community's config",
        responses=_WRITE_ERRORS,
        response_model=CommunityWriteAnswer,
        response_model_exclude_none=True,
    )
    async def replace_config(community_id: str, body: Annotated[ConfigBody, Body()]) -> Community:
        """Replace the whole config: keys not given fall back to the instance defaults."""
        config = _checked_config(body)
        community = await communities.update_community(pool, community_id, config=config)
        if community is None:
            raise NotFound("Unknown community")
        await notify({"community_id": community_id})
        return _written(community, config)

    @router.post(
        "/communities/{community_id}/rotate_access_token",
        summary="Issue a new access token for a community",
    )
    async def rotate_access_token(community_id: str) -> RotatedAccessToken:
        """Give the community a new token for the server-centric API (``/_policyserv/v1``).

        The old token stops working at once (every gateway is told to forget it). The new
        one is in this answer only: Warden keeps its SHA-256, never the token."""
        rotation = await community_tokens.rotate_access_token(pool, community_id)
        if rotation is None:
            raise NotFound("Unknown community")
        # The community, never the token, is what the log names.
        logger.info(
            "community access token rotated",
            extra={"community_id": community_id, "had_token": rotation.had_access_token},
        )
        # Every gateway drops the old token it keeps. The rotation is committed and its
        # token shown only here, so a failed notice (logged and counted by ``notify``)
        # does not fail the answer: the old token then lapses within
        # PS_COMMUNITY_TOKEN_CACHE_SECONDS.
        with contextlib.suppress(Unavailable):
            await notify({"community_id": community_id})
        return RotatedAccessToken(
            old_access_token="",
            new_access_token=rotation.new_access_token,
            had_access_token=rotation.had_access_token,
        )

    @router.delete(
        "/communities/{community_id}", summary="Delete a community", responses=_WRITE_ERRORS
    )
    async def delete_community(
        community_id: str, move_rooms_to: str | None = None
    ) -> DeletedCommunity:
        """Delete a community and its token. Refused (400 ``M_BAD_STATE``) while it
        protects rooms, unless ``move_rooms_to`` names the community they move to. The
        ``default`` community cannot be deleted (start-up joins use it)."""
        if community_id == communities.DEFAULT_COMMUNITY_ID:
            raise BadState("The default community cannot be deleted")
        try:
            moved = await communities.delete_community(
                pool, community_id, move_rooms_to=move_rooms_to
            )
        except communities.CommunityHasRooms as exc:
            raise BadState(
                f"The community protects {exc.rooms} room(s): move them first "
                "(?move_rooms_to=<community_id>) or unprotect them"
            ) from None
        except communities.UnknownMoveTarget:
            raise InvalidParam(
                f"move_rooms_to: unknown community {move_rooms_to!r} (or the one deleted)"
            ) from None
        if moved is None:
            raise NotFound("Unknown community")
        # Not a room ID: every worker and gateway drops what it cached of rooms and
        # this community.
        await notify({"community_id": community_id})
        return DeletedCommunity(moved_room_ids=moved)

    @router.get(
        "/instance/community_config",
        summary="The instance defaults",
        response_model=ConfigBody,
    )
    async def get_instance_config() -> dict[str, Any]:
        """Code defaults overlaid with ``PS_*`` environment values: what a community
        inherits for every key it does not set. Instance-only keys are not shown."""
        return community_defaults

    # --- Rooms ---------------------------------------------------------------------

    @router.get("/rooms", summary="List protected rooms")
    async def list_rooms() -> list[Room]:
        """Every protected room, ordered by room ID (``[]`` when there are none)."""
        return [_room(r) for r in await rooms.list_rooms(pool)]

    @router.get("/rooms/{room_id}", summary="Get a protected room")
    async def get_room(room_id: str) -> RoomDetail:
        """One protected room, with what its learned ``m.room.policy`` says of Warden."""
        room = await rooms.get_room(pool, room_id)
        if room is None:
            raise NotFound("Unknown room")
        policy = await room_state.get_policy_server(pool, room_id, server_name, policy_public_key)
        return RoomDetail.model_validate({**room.to_api(), "policy_server": policy.to_api()})

    @router.put("/rooms/{room_id}", summary="Protect or move a room", responses=_WRITE_ERRORS)
    async def protect_room(room_id: str, body: ProtectRoomRequest) -> Room:
        """Protect a room for a community, or move it to another one / correct its version.

        An unknown community is 400 ``M_BAD_JSON`` naming ``community_id`` (the room,
        the resource of this path, is not what is missing).
        """
        version = get_room_version(body.room_version)  # M_UNSUPPORTED_ROOM_VERSION
        _check_room_id(room_id, version)
        if await communities.get_community(pool, body.community_id) is None:
            raise BadJSON(f"community_id: unknown community {body.community_id!r}")
        try:
            room = await rooms.put_room(pool, room_id, version.identifier, body.community_id)
        except asyncpg.ForeignKeyViolationError:
            raise BadJSON(f"community_id: unknown community {body.community_id!r}") from None
        await notify({"room_id": room_id})
        return _room(room)

    @router.delete("/rooms/{room_id}", summary="Stop protecting a room", responses=_WRITE_ERRORS)
    async def unprotect_room(room_id: str) -> EmptyBody:
        """Forget the room: ``/sign`` requests for it are refused from now on."""
        if not await rooms.delete_room(pool, room_id):
            raise NotFound("Unknown room")
        await notify({"room_id": room_id})
        return EmptyBody()

    # --- Joining, leaving and invites ------------------------------------------------

    if joiner is not None:

        @router.post(
            "/rooms/{room_id}/join", summary="Join and protect a room", responses=_JOIN_ERRORS
        )
        async def join_room(room_id: str, body: JoinRoomRequest) -> RoomDetail:
            """Join the room over federation (make_join/send_join) and protect it for the
            community. A room Warden already knows is joined again (after a kick, say), and
            moved when the community differs. The answer is the room as ``GET`` shows it,
            ``policy_server`` learned from the state the join brought."""
            _check_any_room_id(room_id)
            if await communities.get_community(pool, body.community_id) is None:
                raise BadJSON(f"community_id: unknown community {body.community_id!r}")
            for server in body.via or []:
                if not is_valid_server_name(server):
                    raise BadJSON(f"via: {server!r} is not a server name")
            outcome = await join_or_raise(joiner, room_id, body.community_id, body.via)
            policy = await room_state.get_policy_server(
                pool, room_id, server_name, policy_public_key
            )
            return RoomDetail.model_validate(
                {**outcome.room.to_api(), "policy_server": policy.to_api()}
            )

        @router.post("/rooms/{room_id}/leave", summary="Leave a room", responses=_JOIN_ERRORS)
        async def leave_room(
            room_id: str, body: Annotated[LeaveRoomRequest | None, Body()] = None
        ) -> EmptyBody:
            """Leave the room over federation (make_leave/send_leave) and stop protecting
            it; an invite approval of the room is withdrawn. When the leave cannot be
            completed nothing changes: ``DELETE /rooms/{room_id}`` stops protecting a room
            without leaving it."""
            _check_any_room_id(room_id)
            if (
                await rooms.get_room(pool, room_id) is None
                and await membership_store.get_membership(pool, room_id) is None
            ):
                raise NotFound("Unknown room")
            via = body.via if body is not None else None
            for server in via or []:
                if not is_valid_server_name(server):
                    raise BadJSON(f"via: {server!r} is not a server name")
            try:
                await joiner.leave(room_id, via)
            except MembershipFailed as exc:
                raise membership_error(exc) from None
            except NotificationFailed:
                raise Unavailable(
                    "Left the room, but the gateways could not be notified; repeat the request"
                ) from None
            return EmptyBody()

    @router.post(
        "/rooms/{room_id}/approve_invite",
        summary="Accept invites to a room",
    )
    async def approve_invite(room_id: str, body: ApproveInviteRequest) -> InviteApproval:
        """From now on an invite of Warden's user to this room is accepted, and Warden
        joins the room into the community. Replaces an earlier approval of the room."""
        _check_any_room_id(room_id)
        if await communities.get_community(pool, body.community_id) is None:
            raise BadJSON(f"community_id: unknown community {body.community_id!r}")
        try:
            approval = await membership_store.approve_invites(pool, room_id, body.community_id)
        except asyncpg.ForeignKeyViolationError:
            raise BadJSON(f"community_id: unknown community {body.community_id!r}") from None
        return InviteApproval.model_validate(approval.to_api())

    @router.get("/rooms/{room_id}/approve_invite", summary="Is a room approved for invites")
    async def get_invite_approval(room_id: str) -> InviteApproval:
        """The room's invite approval; 404 when invites to it are refused."""
        approval = await membership_store.get_invite_approval(pool, room_id)
        if approval is None:
            raise NotFound("Invites to this room are not approved")
        return InviteApproval.model_validate(approval.to_api())

    @router.delete("/rooms/{room_id}/approve_invite", summary="Refuse invites to a room again")
    async def withdraw_invite_approval(room_id: str) -> EmptyBody:
        """Withdraw the approval: invites to the room are refused again."""
        if not await membership_store.withdraw_invite_approval(pool, room_id):
            raise NotFound("Invites to this room are not approved")
        return EmptyBody()

    @router.post(
        "/set_room_moderator",
        summary="Set the user who redacts in a room",
        deprecated=True,
        responses=_WRITE_ERRORS,
    )
    async def set_room_moderator(body: SetRoomModeratorRequest) -> SetRoomModeratorRequest:
        """Set (or, with ``""``, unset) the moderator used for redactions; echoes the body.

        Deprecated in policyserv, kept because the moderator service's access-token
        redactions use it.
        """
        if body.moderator_user_id:
            _check_user_id(body.moderator_user_id)
        if await rooms.set_moderator(pool, body.room_id, body.moderator_user_id) is None:
            raise NotFound("Unknown room")
        await notify({"room_id": body.room_id})
        return body

    # --- Verdicts ------------------------------------------------------------------

    @router.get(
        "/events/{event_id:path}",
        summary="Why an event was signed or refused",
        response_model_exclude_none=True,
    )
    async def get_event_verdict(
        event_id: Annotated[str, Path(description="The event ID, e.g. $abc… (may contain /)")],
    ) -> Verdict:
        """The stored verdict for an event, with every filter's outcome."""
        verdict = await verdicts.get_verdict(pool, event_id)
        if verdict is None:
            raise NotFound("No verdict for this event")
        return Verdict.model_validate(
            {**verdict.to_dict(), "sender_verified": verdict.sender_verified}
        )

    # --- Keyword templates (keyword_templates_api) -----------------------------------

    add_keyword_template_routes(router, pool=pool, nats=nats)

    # --- Trust sources (trust_sources_api) ------------------------------------------

    add_trust_source_routes(router, pool=pool)

    return router

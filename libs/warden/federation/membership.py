"""Warden's own membership in rooms: joining, leaving and accepting invites.

Spec: Server-Server API, "Joining Rooms" (``make_join`` / ``send_join`` v2, falling back
to v1), "Leaving Rooms" (``make_leave`` / ``send_leave``) and "Inviting to a room"
(``/invite`` v2 and v1). Warden joins as one user, ``@<PS_JOIN_LOCALPART>:<server>``,
and signs its membership events with its federation key (never the policy key).

How a membership event is built from the resident server's template (as Synapse does in
``create_local_event_from_event_dict``):

* the template's ``type``, ``room_id``, ``sender``, ``state_key``, ``depth``,
  ``prev_events`` and ``auth_events`` are kept (the resident server chose them);
  ``content`` is kept and ``membership`` set, so a restricted join's
  ``join_authorised_via_users_server`` survives;
* ``origin_server_ts`` is now; ``unsigned``, ``hashes`` and ``signatures`` are dropped;
* room versions 1 and 2: a fresh ``event_id`` on our server name (the resident's would
  need its signature); ``origin`` is our name in versions 1 to 10, where redaction
  keeps it, and removed from 11 on (Synapse sends none at all; the spec's older PDU
  schemas still list it);
* the content hash is added, the event signed and its ID computed for the version.

Nothing here touches storage: the gateway's ``room_joins`` module records the outcome.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from warden.federation.errors import (
    FederationError,
    HttpResponseError,
    InvalidResponse,
    TemporaryFederationError,
)
from warden.federation.keyring_errors import KeyringError
from warden.federation.xmatrix import VerifyKeySource, is_valid_server_name
from warden.matrix.errors import BadJSON, Forbidden, InvalidParam, MatrixError
from warden.matrix.event_hashes import add_content_hash, check_content_hash, compute_event_id
from warden.matrix.event_signing import (
    EventSignatureError,
    EventSigningKey,
    EventVerifyKey,
    servers_required_to_sign,
    sign_event,
    verify_sender_signature,
)
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.pdu import InvalidPDU, validate_pdu
from warden.matrix.room_versions import (
    KNOWN_ROOM_VERSIONS,
    RoomVersion,
    UnknownRoomVersionError,
    get_room_version,
)

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ROOM_VERSIONS",
    "IncompatibleRoomVersion",
    "InviteRejected",
    "JoinResult",
    "LeaveResult",
    "MembershipClient",
    "MembershipFailed",
    "MembershipTransport",
    "candidate_servers",
    "check_invite",
    "countersign_invite",
    "is_unknown_endpoint",
]

SUPPORTED_ROOM_VERSIONS: tuple[str, ...] = tuple(KNOWN_ROOM_VERSIONS)
"""Every stable room version, sent as ``ver`` on ``make_join``."""

# A server has a handful of keys; more signatures than this under one name are refused
# before any key lookup.
_MAX_KEYS_PER_SERVER = 8


class MembershipTransport(Protocol):
    """What joining and leaving need from ``FederationClient``."""

    async def get_json(
        self,
        destination: str,
        path: str,
        *,
        query: Mapping[str, str | Sequence[str]] | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]: ...

    async def put_json(
        self,
        destination: str,
        path: str,
        body: Mapping[str, Any],
        *,
        query: Mapping[str, str | Sequence[str]] | None = None,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]: ...

    async def put_json_legacy_pair(
        self,
        destination: str,
        path: str,
        body: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]: ...


class IncompatibleRoomVersion(MatrixError):
    """400 ``M_INCOMPATIBLE_ROOM_VERSION``: the spec's answer to an invite into a room
    version this server does not support."""

    errcode = "M_INCOMPATIBLE_ROOM_VERSION"
    status = 400


class InviteRejected(Forbidden):
    """403 ``M_FORBIDDEN``: the invite is valid but not for a room Warden may join."""


@dataclass
class MembershipFailed(Exception):
    """No candidate server completed the join or leave.

    ``reasons`` maps each server tried to why it failed. ``temporary`` is True when every
    failure may go away by itself (timeouts, 5xx, refused connections): worth retrying.
    ``unsupported_version`` is set when a server answered with a room version Warden
    does not know (or refused ours): retrying elsewhere will not help.
    """

    action: str
    room_id: str
    reasons: dict[str, str] = field(default_factory=dict)
    temporary: bool = False
    unsupported_version: str | None = None
    version_mismatch: bool = False

    def __str__(self) -> str:
        if not self.reasons:
            return f"could not {self.action} {self.room_id}: no server to ask"
        detail = "; ".join(f"{server}: {why}" for server, why in self.reasons.items())
        return f"could not {self.action} {self.room_id}: {detail}"


@dataclass(frozen=True)
class JoinResult:
    """A completed join: our event, and the room as the resident server described it."""

    room_id: str
    room_version: str
    event_id: str
    server: str
    """The resident server that accepted the join."""
    api_version: str
    """``v2`` or ``v1`` (the send_join endpoint that answered)."""
    event: dict[str, Any]
    state: list[dict[str, Any]]
    auth_chain: list[dict[str, Any]]


@dataclass(frozen=True)
class LeaveResult:
    """A completed leave."""

    room_id: str
    room_version: str
    event_id: str
    server: str
    api_version: str


class _ServerFailure(Exception):
    """One candidate server failed; the message says why (kept for the caller)."""

    def __init__(self, message: str, *, temporary: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary


class _VersionMismatch(_ServerFailure):
    def __init__(self, recorded: str, offered: object) -> None:
        super().__init__(
            f"make_join names room version {offered!r}; the room's recorded version is {recorded!r}"
        )


class _UnsupportedVersion(_ServerFailure):
    def __init__(self, version: str) -> None:
        super().__init__(f"room version {version!r} is not supported by Warden")
        self.version = version


def is_unknown_endpoint(exc: FederationError) -> bool:
    """Whether a failed request means "I do not have that endpoint" (spec v1.6+: 404/405
    ``M_UNRECOGNIZED``; older servers: an empty or non-JSON 404/405, or 400
    ``M_UNRECOGNIZED``), which is when Synapse falls back from v2 to v1."""
    if not isinstance(exc, HttpResponseError):
        return False
    if exc.status in (404, 405):
        return exc.errcode is None or exc.errcode == "M_UNRECOGNIZED"
    return exc.status == 400 and exc.errcode == "M_UNRECOGNIZED"


def _server_part(identifier: str) -> str | None:
    _, sep, server = identifier.partition(":")
    return server if sep and server else None


def candidate_servers(
    room_id: str, via: Iterable[str], *, fallback: Iterable[str] = (), exclude: str = ""
) -> list[str]:
    """Servers to ask, in order: ``via``, then ``fallback``, then the room ID's server part
    (room versions 1 to 11 name the creator's server there). Duplicates, invalid names
    and ``exclude`` (our own name) are dropped."""
    ordered: list[str] = []
    room_server = _server_part(room_id)
    for server in (*via, *fallback, *([room_server] if room_server else [])):
        if server and server != exclude and server not in ordered and is_valid_server_name(server):
            ordered.append(server)
    return ordered


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class MembershipClient:
    """Joins and leaves rooms over federation as Warden's user."""

    def __init__(
        self,
        transport: MembershipTransport,
        *,
        server_name: str,
        localpart: str,
        signing_key: EventSigningKey,
        key_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._transport = transport
        self.server_name = server_name
        self.user_id = f"@{localpart}:{server_name}"
        self._signing_key = signing_key
        self._key_id = key_id
        self._clock = clock

    # --- joining ---

    async def join(
        self, room_id: str, servers: Sequence[str], *, room_version: str | None = None
    ) -> JoinResult:
        """Join ``room_id`` through the first of ``servers`` that completes the handshake.

        ``room_version``, for a room Warden already knows, is the recorded version: a
        server whose ``make_join`` names another one is refused before anything is
        sent to it (a room's version never changes; a server saying otherwise is wrong
        or lying). Raises ``MembershipFailed`` with every server's reason when none
        does (``version_mismatch`` set when a server named another version).
        """
        return await self._first_server(
            "join",
            room_id,
            servers,
            lambda server: self._join_through(room_id, server, room_version),
        )

    async def _join_through(
        self, room_id: str, server: str, expected_version: str | None = None
    ) -> JoinResult:
        path = f"/_matrix/federation/v1/make_join/{_quote(room_id)}/{_quote(self.user_id)}"
        template = await self._make_membership(server, path, {"ver": list(SUPPORTED_ROOM_VERSIONS)})
        if expected_version is not None:
            offered = template.get("room_version", "1")
            if offered != expected_version:
                logger.error(
                    "make_join names another version than the room's recorded one; refused",
                    extra={
                        "room_id": room_id,
                        "server": server,
                        "recorded": expected_version,
                        "offered": offered if isinstance(offered, str) else repr(offered),
                    },
                )
                raise _VersionMismatch(expected_version, offered)
        room_version, event = self._build_event(room_id, server, template, "join")
        event_id = compute_event_id(room_version, event)
        answer, api_version = await self._send_membership(
            server, "send_join", room_id, event_id, event
        )
        state = _event_list(answer, "state", server, required=True)
        auth_chain = _event_list(answer, "auth_chain", server, required=False)
        # A restricted join comes back signed by the authorising server too: keep that
        # copy when it is our event.
        returned = answer.get("event")
        if isinstance(returned, dict):
            try:
                if compute_event_id(room_version, returned) == event_id:
                    event = returned
            except ValueError:
                pass
        logger.info(
            "joined room",
            extra={
                "room_id": room_id,
                "server": server,
                "room_version": room_version.identifier,
                "api": api_version,
                "state_events": len(state),
            },
        )
        return JoinResult(
            room_id=room_id,
            room_version=room_version.identifier,
            event_id=event_id,
            server=server,
            api_version=api_version,
            event=event,
            state=state,
            auth_chain=auth_chain,
        )

    # --- leaving ---

    async def leave(self, room_id: str, servers: Sequence[str]) -> LeaveResult:
        """Leave ``room_id`` through the first of ``servers`` that completes the handshake.

        Raises ``MembershipFailed`` with every server's reason when none does.
        """
        return await self._first_server(
            "leave", room_id, servers, lambda server: self._leave_through(room_id, server)
        )

    async def _leave_through(self, room_id: str, server: str) -> LeaveResult:
        path = f"/_matrix/federation/v1/make_leave/{_quote(room_id)}/{_quote(self.user_id)}"
        template = await self._make_membership(server, path, None)
        room_version, event = self._build_event(room_id, server, template, "leave")
        event_id = compute_event_id(room_version, event)
        _, api_version = await self._send_membership(server, "send_leave", room_id, event_id, event)
        logger.info(
            "left room",
            extra={"room_id": room_id, "server": server, "api": api_version},
        )
        return LeaveResult(room_id, room_version.identifier, event_id, server, api_version)

    # --- shared ---

    async def _first_server(
        self,
        action: str,
        room_id: str,
        servers: Sequence[str],
        attempt: Callable[[str], Awaitable[_T]],
    ) -> _T:
        """``attempt`` through each server in turn; the first success wins.

        Raises ``MembershipFailed`` with every server's reason when none succeeds
        (temporary only when every failure was).
        """
        failure = MembershipFailed(action, room_id)
        temporary = True
        for server in servers:
            try:
                return await attempt(server)
            except _ServerFailure as exc:
                self._note_failure(failure, server, exc)
                temporary = temporary and exc.temporary
            except FederationError as exc:
                failure.reasons[server] = exc.reason
                temporary = temporary and isinstance(exc, TemporaryFederationError)
        failure.temporary = temporary and bool(servers) and failure.unsupported_version is None
        raise failure

    async def _send_membership(
        self, server: str, endpoint: str, room_id: str, event_id: str, event: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        """``PUT`` ``send_join``/``send_leave``: v2, falling back to v1 where v2 is unknown
        (v1 answers ``[200, {...}]``). Returns the answer and the API version used."""
        suffix = f"{endpoint}/{_quote(room_id)}/{_quote(event_id)}"
        try:
            return await self._transport.put_json(
                server, f"/_matrix/federation/v2/{suffix}", event
            ), "v2"
        except FederationError as exc:
            if not is_unknown_endpoint(exc):
                raise
        answer = await self._transport.put_json_legacy_pair(
            server, f"/_matrix/federation/v1/{suffix}", event
        )
        return answer, "v1"

    @staticmethod
    def _note_failure(failure: MembershipFailed, server: str, exc: _ServerFailure) -> None:
        failure.reasons[server] = str(exc)
        if isinstance(exc, _UnsupportedVersion):
            failure.unsupported_version = exc.version
        if isinstance(exc, _VersionMismatch):
            failure.version_mismatch = True

    async def _make_membership(
        self, server: str, path: str, query: Mapping[str, str | Sequence[str]] | None
    ) -> dict[str, Any]:
        try:
            return await self._transport.get_json(server, path, query=query)
        except HttpResponseError as exc:
            if exc.errcode == "M_INCOMPATIBLE_ROOM_VERSION":
                # The spec's error carries the room's version in ``room_version``.
                version = exc.body.get("room_version")
                raise _UnsupportedVersion(
                    version if isinstance(version, str) else "unknown"
                ) from None
            raise

    def _build_event(
        self, room_id: str, server: str, answer: Mapping[str, Any], membership: str
    ) -> tuple[RoomVersion, dict[str, Any]]:
        """Our signed membership event from a ``make_join``/``make_leave`` answer."""
        # Without room_version the room is version 1 or 2 (the spec's default), which
        # hash and sign alike.
        identifier = answer.get("room_version", "1")
        if not isinstance(identifier, str):
            raise _ServerFailure("make_" + membership + ": room_version is not a string")
        try:
            room_version = get_room_version(identifier)
        except UnknownRoomVersionError:
            raise _UnsupportedVersion(identifier) from None
        template = answer.get("event")
        if not isinstance(template, dict):
            raise _ServerFailure(f"make_{membership}: no event template in the answer")
        expected = {
            "type": "m.room.member",
            "room_id": room_id,
            "sender": self.user_id,
            "state_key": self.user_id,
        }
        for key, value in expected.items():
            if template.get(key) != value:
                raise _ServerFailure(
                    f"make_{membership}: the template's {key} is {template.get(key)!r}, "
                    f"expected {value!r}"
                )
        content = template.get("content", {})
        if not isinstance(content, dict):
            raise _ServerFailure(f"make_{membership}: the template's content is not an object")
        event = {k: v for k, v in template.items() if k not in ("unsigned", "hashes", "signatures")}
        event["content"] = {**content, "membership": membership}
        event["origin_server_ts"] = int(self._clock() * 1000)
        if room_version.updated_redaction_rules:
            event.pop("origin", None)
        else:
            event["origin"] = self.server_name
        if room_version.event_id_in_json:
            event["event_id"] = f"${secrets.token_urlsafe(18)}:{self.server_name}"
        else:
            event.pop("event_id", None)
        try:
            add_content_hash(event)
            sign_event(room_version, event, self.server_name, self._signing_key, self._key_id)
            validate_pdu(room_version, event)
        except InvalidPDU as exc:
            raise _ServerFailure(f"make_{membership}: unusable template: {exc.error}") from None
        except ValueError as exc:  # not canonical JSON
            raise _ServerFailure(f"make_{membership}: unusable template: {exc}") from None
        logger.debug(
            "built membership event",
            extra={"room_id": room_id, "server": server, "membership": membership},
        )
        return room_version, event


def _event_list(
    answer: Mapping[str, Any], key: str, server: str, *, required: bool
) -> list[dict[str, Any]]:
    value = answer.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidResponse(server, f"send_join: '{key}' is not a list of events")
    return value


# --- invites ---------------------------------------------------------------------------


async def check_invite(
    *,
    room_version_id: object,
    event: object,
    room_id: str,
    event_id: str,
    origin: str,
    our_user_id: str,
    keyring: VerifyKeySource,
) -> tuple[RoomVersion, dict[str, Any]]:
    """Validate an inbound invite of Warden's user; return the room version and event.

    Checks, each failure a Matrix error: the room version is supported (400
    ``M_INCOMPATIBLE_ROOM_VERSION``), the event is a well-formed PDU with a correct
    content hash (400 ``M_BAD_JSON``), its room and ID are the path's (400
    ``M_INVALID_PARAM``), it is an ``m.room.member`` invite of ``our_user_id`` sent by a
    user of ``origin`` (403 ``M_FORBIDDEN``), and every server required to sign it has
    (403 ``M_FORBIDDEN``). Whether the room is one Warden may join is the caller's call.
    """
    if not isinstance(room_version_id, str):
        raise BadJSON("room_version must be a string")
    try:
        room_version = get_room_version(room_version_id)
    except UnknownRoomVersionError:
        raise IncompatibleRoomVersion(
            f"Room version {room_version_id!r} is not supported", room_version=room_version_id
        ) from None
    pdu = validate_pdu(room_version, event)
    if pdu.get("room_id") != room_id:
        raise InvalidParam("The invite event's room_id is not the room in the path")
    try:
        actual_id = compute_event_id(room_version, pdu)
    except ValueError as exc:
        raise BadJSON(f"The invite event has no usable ID: {exc}") from None
    if actual_id != event_id:
        raise InvalidParam(f"The event ID in the path is not the invite event's ID ({actual_id})")
    if not check_content_hash(pdu):
        raise BadJSON("The invite event's content hash (hashes.sha256) does not match")
    content = pdu["content"]
    if pdu["type"] != "m.room.member" or content.get("membership") != "invite":
        raise Forbidden("Only m.room.member invite events can be sent to this endpoint")
    if pdu.get("state_key") != our_user_id:
        raise Forbidden(f"This server only accepts invites for {our_user_id}")
    if _server_part(pdu["sender"]) != origin:
        raise Forbidden("The invite's sender is not a user of the server sending it")
    await _verify_signatures(room_version, pdu, keyring)
    return room_version, pdu


async def _verify_signatures(
    room_version: RoomVersion, pdu: dict[str, Any], keyring: VerifyKeySource
) -> None:
    try:
        required = servers_required_to_sign(room_version, pdu)
    except EventSignatureError as exc:
        raise BadJSON(f"invalid PDU: {exc}") from None
    at_ms = int(pdu["origin_server_ts"]) if room_version.enforce_key_validity else None
    signatures: dict[str, Any] = pdu["signatures"]
    verify_keys: dict[str, dict[str, EventVerifyKey]] = {}
    for server in required:
        by_server = signatures.get(server)
        if not isinstance(by_server, dict):
            raise Forbidden(f"The invite event is not signed by {server}")
        key_ids = [k for k in by_server if k.startswith("ed25519:")]
        if len(key_ids) > _MAX_KEYS_PER_SERVER:
            raise Forbidden(f"The invite event carries too many signatures by {server}")
        found: dict[str, EventVerifyKey] = {}
        for key_id in key_ids:
            try:
                found[key_id] = await keyring.get_verify_key(
                    ServerName(server), KeyID(key_id), at_ms=at_ms
                )
            except KeyringError:
                continue
        verify_keys[server] = found
    try:
        verify_sender_signature(room_version, pdu, verify_keys, servers=required)
    except EventSignatureError as exc:
        raise Forbidden(f"The invite event's signatures do not verify: {exc}") from None


def countersign_invite(
    room_version: RoomVersion,
    event: Mapping[str, Any],
    *,
    server_name: str,
    signing_key: EventSigningKey,
    key_id: str,
) -> dict[str, Any]:
    """The invite event with our federation key's signature added (what ``/invite``
    answers). ``unsigned.invite_room_state`` is dropped, as Synapse does: it was only for
    us."""
    signed = dict(event)
    signed["signatures"] = {
        server: dict(keys) for server, keys in dict(event.get("signatures", {})).items()
    }
    unsigned = event.get("unsigned")
    if isinstance(unsigned, dict) and "invite_room_state" in unsigned:
        signed["unsigned"] = {k: v for k, v in unsigned.items() if k != "invite_room_state"}
    sign_event(room_version, signed, server_name, signing_key, key_id)
    return signed

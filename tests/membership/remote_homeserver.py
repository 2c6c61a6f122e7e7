"""A resident homeserver for Warden to join, leave and be invited by.

``RemoteHomeserver`` is a real HTTPS federation server on loopback (started by the
``https_server`` fixture, certificate from the test CA). It holds small rooms whose
events are built, hashed and signed with ``warden.matrix`` and a test key, and answers
``make_join``/``send_join`` (v2 and v1), ``make_leave``/``send_leave`` (v2 and v1) and
``/_matrix/key/v2/server``. Like a real resident server it checks what it receives:
X-Matrix on every request (with the gateway's federation key, which the test hands it),
and for joins and leaves the event's content hash, its ID (with Synapse's own event
code as the oracle) and Warden's signature.
Failures can be injected: ``fail_make_join`` 500s, ``v2_enabled = False`` (v2 send_join
and send_leave answer 404 ``M_UNRECOGNIZED``), ``make_join_error``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from signedjson.key import generate_signing_key
from signedjson.sign import verify_signed_json
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto.event_signing import check_event_content_hash
from synapse.events import make_event_from_dict
from synapse.synapse_rust.events import redact_event_dict
from unpaddedbase64 import encode_base64

from warden.federation.server_key_document import build_server_key_document
from warden.federation.xmatrix import sign_request, verify_request
from warden.matrix.canonical_json import parse_canonical
from warden.matrix.errors import MatrixError
from warden.matrix.event_hashes import (
    add_content_hash,
    compute_event_id,
    compute_reference_hash,
    room_id_from_create_event,
)
from warden.matrix.event_signing import sign_event
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import SigningKey, VerifyKey
from warden.matrix.room_versions import get_room_version


def _error(status: int, errcode: str, error: str, **extra: str) -> Response:
    return Response(
        orjson.dumps({"errcode": errcode, "error": error, **extra}),
        status_code=status,
        media_type="application/json",
    )


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


class _KnownKeys:
    """The keyring of the remote: only the keys the test gave it."""

    def __init__(self, keys: dict[str, dict[str, VerifyKey]]) -> None:
        self.keys = keys

    async def get_verify_key(
        self, server_name: ServerName, key_id: KeyID, *, at_ms: int | None = None
    ) -> VerifyKey:
        from warden.federation.keyring_errors import KeyNotFound

        try:
            return self.keys[server_name][key_id]
        except KeyError:
            raise KeyNotFound(f"{server_name} {key_id} unknown to the remote") from None


@dataclass
class RemoteRoom:
    """One room on the remote: its events in order and its current state."""

    room_id: str
    version: str
    events: list[dict[str, Any]] = field(default_factory=list)
    state: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


@dataclass
class Received:
    """One join, leave or other request the remote accepted."""

    method: str
    path: str
    event: dict[str, Any] | None = None


@dataclass
class RemoteHomeserver:
    """See the module docstring. ``name`` is set once the HTTPS server runs."""

    key: SigningKey = field(
        default_factory=lambda: generate_signing_key("r" + uuid.uuid4().hex[:6])
    )
    name: str = ""
    rooms: dict[str, RemoteRoom] = field(default_factory=dict)
    # Servers whose X-Matrix and event signatures the remote can check.
    known_keys: dict[str, dict[str, VerifyKey]] = field(default_factory=dict)
    fail_make_join: int = 0
    make_join_error: tuple[int, str, str] | None = None
    v2_enabled: bool = True
    requests: list[Received] = field(default_factory=list)
    joins: list[Received] = field(default_factory=list)
    leaves: list[Received] = field(default_factory=list)

    @property
    def key_id(self) -> str:
        return f"ed25519:{self.key.version}"

    @property
    def creator(self) -> str:
        return f"@creator:{self.name}"

    def trust(self, server_name: str, key_id: str, verify_key: VerifyKey) -> None:
        """Let the remote check requests and events signed by ``server_name``."""
        self.known_keys.setdefault(server_name, {})[key_id] = verify_key

    # --- building events ---

    def _finish(self, version: str, event: dict[str, Any]) -> dict[str, Any]:
        room_version = get_room_version(version)
        if room_version.event_id_in_json:
            event["event_id"] = f"${uuid.uuid4().hex}:{self.name}"
        add_content_hash(event)
        sign_event(room_version, event, self.name, self.key, self.key_id)
        return event

    def _ref(self, room: RemoteRoom, event: dict[str, Any]) -> Any:
        room_version = get_room_version(room.version)
        event_id = compute_event_id(room_version, event)
        if room_version.event_id_in_json:
            digest = encode_base64(compute_reference_hash(room_version, event))
            return [event_id, {"sha256": digest}]
        return event_id

    def _auth_refs(self, room: RemoteRoom, *keys: tuple[str, str]) -> list[Any]:
        room_version = get_room_version(room.version)
        wanted = [("m.room.create", ""), *keys]
        refs = []
        for key in wanted:
            if key == ("m.room.create", "") and room_version.room_ids_as_hashes:
                continue  # v12: the room ID is the create event
            if key in room.state:
                refs.append(self._ref(room, room.state[key]))
        return refs

    def _append(self, room: RemoteRoom, event: dict[str, Any]) -> None:
        room.events.append(event)
        if "state_key" in event:
            room.state[(event["type"], event["state_key"])] = event

    def new_event(
        self,
        room: RemoteRoom,
        event_type: str,
        content: dict[str, Any],
        *,
        state_key: str | None = None,
        sender: str | None = None,
        append: bool = True,
    ) -> dict[str, Any]:
        """An event of the room on top of its last event, signed by the remote."""
        event: dict[str, Any] = {
            "type": event_type,
            "room_id": room.room_id,
            "sender": sender or self.creator,
            "content": content,
            "origin_server_ts": int(time.time() * 1000),
            "depth": len(room.events) + 1,
            "prev_events": [self._ref(room, room.events[-1])] if room.events else [],
            "auth_events": self._auth_refs(
                room, ("m.room.power_levels", ""), ("m.room.member", sender or self.creator)
            ),
        }
        if state_key is not None:
            event["state_key"] = state_key
        self._finish(room.version, event)
        if append:
            self._append(room, event)
        return event

    def create_room(self, version: str, *, join_rule: str = "public") -> str:
        """A room with a create event, the creator's join, power levels and join rules."""
        room_version = get_room_version(version)
        create: dict[str, Any] = {
            "type": "m.room.create",
            "state_key": "",
            "sender": self.creator,
            "content": {"room_version": version},
            "origin_server_ts": int(time.time() * 1000),
            "depth": 1,
            "prev_events": [],
            "auth_events": [],
        }
        if not room_version.implicit_room_creator:
            create["content"]["creator"] = self.creator
        if room_version.room_ids_as_hashes:
            self._finish(version, create)
            room_id = room_id_from_create_event(create, room_version)
        else:
            room_id = f"!{uuid.uuid4().hex}:{self.name}"
            create["room_id"] = room_id
            self._finish(version, create)
        room = RemoteRoom(room_id, version)
        self._append(room, create)
        self.rooms[room_id] = room
        self.new_event(
            room,
            "m.room.member",
            {"membership": "join", "displayname": "Room Creator"},
            state_key=self.creator,
        )
        self.new_event(room, "m.room.power_levels", {"users": {self.creator: 100}}, state_key="")
        self.new_event(room, "m.room.join_rules", {"join_rule": join_rule}, state_key="")
        return room_id

    def invite_event(self, room_id: str, user_id: str) -> dict[str, Any]:
        """An invite of ``user_id`` by the creator (not appended to the room)."""
        room = self.rooms[room_id]
        return self.new_event(
            room, "m.room.member", {"membership": "invite"}, state_key=user_id, append=False
        )

    def auth_header(self, destination: str, method: str, uri: str, body: Any) -> str:
        """X-Matrix for a request from this remote."""
        return sign_request(self.name, destination, method, uri, body, self.key)

    # --- serving ---

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/_matrix/key/v2/server", self._keys, methods=["GET"]),
                Route(
                    "/_matrix/federation/v1/make_join/{room_id}/{user_id}",
                    self._make_join,
                    methods=["GET"],
                ),
                Route(
                    "/_matrix/federation/v1/make_leave/{room_id}/{user_id}",
                    self._make_leave,
                    methods=["GET"],
                ),
                Route(
                    "/_matrix/federation/{api}/send_join/{room_id}/{event_id:path}",
                    self._send_join,
                    methods=["PUT"],
                ),
                Route(
                    "/_matrix/federation/{api}/send_leave/{room_id}/{event_id:path}",
                    self._send_leave,
                    methods=["PUT"],
                ),
            ]
        )

    async def _keys(self, request: Request) -> Response:
        return _json(build_server_key_document(self.name, self.key))

    async def _authenticate(self, request: Request, body: Any) -> str:
        raw_path = request.scope["raw_path"].decode()
        query = request.scope["query_string"].decode()
        uri = f"{raw_path}?{query}" if query else raw_path
        return await verify_request(
            request.method,
            uri,
            body,
            request.headers.getlist("authorization"),
            self.name,
            _KnownKeys(self.known_keys),
        )

    def _template(self, room: RemoteRoom, user_id: str, membership: str) -> dict[str, Any]:
        room_version = get_room_version(room.version)
        template: dict[str, Any] = {
            "type": "m.room.member",
            "room_id": room.room_id,
            "sender": user_id,
            "state_key": user_id,
            "content": {"membership": membership},
            "origin_server_ts": int(time.time() * 1000),
            "depth": len(room.events) + 1,
            "prev_events": [self._ref(room, room.events[-1])],
            "auth_events": self._auth_refs(
                room,
                ("m.room.power_levels", ""),
                ("m.room.join_rules", ""),
                ("m.room.member", user_id),
            ),
        }
        if room_version.event_id_in_json:
            # What the resident server's own event ID would be: the joiner must replace it.
            template["event_id"] = f"${uuid.uuid4().hex}:{self.name}"
        if not room_version.updated_redaction_rules:
            template["origin"] = self.name  # the joiner must put its own name there
        return template

    async def _make(self, request: Request, membership: str) -> Response:
        try:
            origin = await self._authenticate(request, None)
        except MatrixError as exc:
            return _error(401, exc.errcode, exc.error)
        room_id = request.path_params["room_id"]
        user_id = request.path_params["user_id"]
        self.requests.append(Received("GET", f"make_{membership}"))
        if user_id.partition(":")[2] != origin:
            return _error(403, "M_FORBIDDEN", "User not from origin")
        if membership == "join":
            if self.fail_make_join > 0:
                self.fail_make_join -= 1
                return _error(500, "M_UNKNOWN", "injected failure")
            if self.make_join_error is not None:
                return _error(*self.make_join_error)
        room = self.rooms.get(room_id)
        if room is None:
            return _error(404, "M_NOT_FOUND", "Unknown room")
        if membership == "join" and room.version not in request.query_params.getlist("ver"):
            return _error(
                400,
                "M_INCOMPATIBLE_ROOM_VERSION",
                "Your homeserver does not support the features required to join this room",
                room_version=room.version,
            )
        return _json(
            {"event": self._template(room, user_id, membership), "room_version": room.version}
        )

    async def _make_join(self, request: Request) -> Response:
        return await self._make(request, "join")

    async def _make_leave(self, request: Request) -> Response:
        return await self._make(request, "leave")

    def check_membership_event(
        self, room: RemoteRoom, event: dict[str, Any], event_id: str, membership: str, origin: str
    ) -> str | None:
        """What a resident server would object to in the event, or None."""
        synapse_version = SYNAPSE_VERSIONS[room.version]
        try:
            parsed = make_event_from_dict(dict(event), synapse_version)
        except Exception as exc:
            return f"Synapse cannot parse the event: {exc}"
        if parsed.event_id != event_id:
            return f"event ID {event_id} is not the event's ({parsed.event_id})"
        if not check_event_content_hash(parsed):
            return "bad content hash"
        if event.get("content", {}).get("membership") != membership:
            return "wrong membership"
        if event.get("sender", "").partition(":")[2] != origin:
            return "sender not of origin"
        if (
            get_room_version(room.version).event_id_in_json
            and event["event_id"].partition(":")[2] != origin
        ):
            return "v1/v2 event ID not minted by the origin"
        redacted = redact_event_dict(synapse_version, dict(event))
        redacted.pop("unsigned", None)
        try:
            for key_id, verify_key in self.known_keys.get(origin, {}).items():
                if key_id in event.get("signatures", {}).get(origin, {}):
                    verify_signed_json(redacted, origin, verify_key)
                    return None
        except Exception as exc:
            return f"signature does not verify: {exc}"
        return "not signed with a known key of the origin"

    async def _send(self, request: Request, membership: str) -> Response:
        api = request.path_params["api"]
        if api not in ("v1", "v2"):
            return _error(404, "M_UNRECOGNIZED", "Unrecognized request")
        if api == "v2" and not self.v2_enabled:
            return _error(404, "M_UNRECOGNIZED", "Unrecognized request")
        body = parse_canonical(await request.body())
        try:
            origin = await self._authenticate(request, body)
        except MatrixError as exc:
            return _error(401, exc.errcode, exc.error)
        room = self.rooms.get(request.path_params["room_id"])
        if room is None:
            return _error(404, "M_NOT_FOUND", "Unknown room")
        problem = self.check_membership_event(
            room, body, request.path_params["event_id"], membership, origin
        )
        if problem is not None:
            return _error(400, "M_BAD_JSON", problem)
        received = Received("PUT", f"{api}/send_{membership}", body)
        self.requests.append(received)
        state = list(room.state.values())
        self._append(room, body)
        if membership == "join":
            self.joins.append(received)
            answer: dict[str, Any] = {
                "origin": self.name,
                "state": state,
                "auth_chain": state,
                "event": body,
                "members_omitted": False,
            }
        else:
            self.leaves.append(received)
            answer = {}
        return _json([200, answer] if api == "v1" else answer)

    async def _send_join(self, request: Request) -> Response:
        return await self._send(request, "join")

    async def _send_leave(self, request: Request) -> Response:
        return await self._send(request, "leave")

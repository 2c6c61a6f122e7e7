"""Structural validation of a PDU for its room version (spec: Server-Server API, "PDUs",
and the event format section of each room version).

This checks shape, not authorisation: required keys and their types, the ID formats
that differ between versions, per-key size limits, and that everything is canonical
JSON. Floats and out-of-range integers are refused for *every* room version, not only
from v6: this server must sign and hash what it accepts, and canonical JSON cannot
represent them. ``InvalidPDU`` is an ``M_BAD_JSON`` Matrix error and a ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from warden.matrix.canonical_json import CanonicalJSONError, check_canonical
from warden.matrix.errors import BadJSON
from warden.matrix.room_versions import EventFormat, RoomVersion

__all__ = ["MAX_ID_LENGTH", "InvalidPDU", "validate_pdu"]

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

MAX_ID_LENGTH = 255
"""Limit on ``sender``, ``room_id``, ``state_key``, ``type`` and ``event_id`` (spec:
"Size limits"); bytes from v11 (as Synapse counts), code points before."""


class InvalidPDU(BadJSON, ValueError):
    """The PDU is not well formed for its room version. ``key`` names the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"invalid PDU: '{key}' {problem}")
        self.key = key


def _require_str(pdu: Mapping[str, Any], key: str) -> str:
    if key not in pdu:
        raise InvalidPDU(key, "is missing")
    value = pdu[key]
    if type(value) is not str:
        raise InvalidPDU(key, "must be a string")
    return value


def _require_int(pdu: Mapping[str, Any], key: str) -> int:
    if key not in pdu:
        raise InvalidPDU(key, "is missing")
    value = pdu[key]
    if type(value) is not int:  # bool is not an int here
        raise InvalidPDU(key, "must be an integer")
    return value


def _check_length(room_version: RoomVersion, key: str, value: str) -> None:
    size = len(value.encode("utf-8")) if room_version.strict_event_byte_limits else len(value)
    if size > MAX_ID_LENGTH:
        raise InvalidPDU(key, f"is longer than {MAX_ID_LENGTH}")


def _has_server_part(identifier: str) -> bool:
    _, sep, server = identifier.partition(":")
    return bool(sep and server)


def _check_event_refs(room_version: RoomVersion, pdu: Mapping[str, Any], key: str) -> None:
    if key not in pdu:
        raise InvalidPDU(key, "is missing")
    refs = pdu[key]
    if type(refs) is not list:
        raise InvalidPDU(key, "must be a list")
    if room_version.event_format is EventFormat.V1_V2:
        for i, ref in enumerate(refs):
            # [event_id, {"sha256": hash}] pairs in room versions 1 and 2.
            if (
                type(ref) is not list
                or len(ref) != 2
                or type(ref[0]) is not str
                or type(ref[1]) is not dict
            ):
                raise InvalidPDU(f"{key}[{i}]", "must be an [event_id, hashes object] pair")
            if not ref[0].startswith("$") or not _has_server_part(ref[0]):
                raise InvalidPDU(f"{key}[{i}]", "must start with an event ID '$opaque:server'")
    else:
        for i, ref in enumerate(refs):
            if type(ref) is not str or not ref.startswith("$"):
                raise InvalidPDU(f"{key}[{i}]", "must be an event ID string starting with '$'")


def validate_pdu(room_version: RoomVersion, pdu: object) -> dict[str, Any]:
    """Check that ``pdu`` is a well-formed PDU for ``room_version`` and return it.

    The same object is returned (not a copy), typed as a dict. Raises ``InvalidPDU``
    naming the first offending key.
    """
    if type(pdu) is not dict:
        raise InvalidPDU("(pdu)", "must be a JSON object")

    # Canonical JSON first, per top-level key so the error can name it.
    for key, value in pdu.items():
        try:
            check_canonical(value)
        except CanonicalJSONError as exc:
            raise InvalidPDU(str(key), f"is not canonical JSON: {exc}") from None

    event_type = _require_str(pdu, "type")
    _check_length(room_version, "type", event_type)

    is_v12_create = room_version.room_ids_as_hashes and event_type == "m.room.create"
    if is_v12_create:
        if "room_id" in pdu:
            raise InvalidPDU(
                "room_id",
                f"must be absent from m.room.create in room version {room_version.identifier}",
            )
    else:
        room_id = _require_str(pdu, "room_id")
        if not room_id.startswith("!"):
            raise InvalidPDU("room_id", "must start with '!'")
        if not room_version.room_ids_as_hashes and not _has_server_part(room_id):
            raise InvalidPDU("room_id", "must be '!opaque:server'")
        _check_length(room_version, "room_id", room_id)

    sender = _require_str(pdu, "sender")
    if not sender.startswith("@") or not _has_server_part(sender):
        raise InvalidPDU("sender", "must be a user ID '@localpart:server'")
    _check_length(room_version, "sender", sender)

    if room_version.event_format is EventFormat.V1_V2:
        event_id = _require_str(pdu, "event_id")
        if not event_id.startswith("$") or not _has_server_part(event_id):
            raise InvalidPDU("event_id", "must be an event ID '$opaque:server'")
        _check_length(room_version, "event_id", event_id)
        if _CONTROL_CHARS.search(event_id) is not None or event_id != event_id.rstrip():
            # It becomes a NATS header, which nats-py strips and where it turns CR/LF into
            # spaces: "$a\r:x" or "$a:x " would travel as another event's ID ("$a :x",
            # "$a:x"), so the verdict lands under that ID and Nats-Msg-Id dedup drops one.
            raise InvalidPDU("event_id", "must not contain control characters or end in a space")

    if "state_key" in pdu:
        state_key = pdu["state_key"]
        if type(state_key) is not str:
            raise InvalidPDU("state_key", "must be a string")
        _check_length(room_version, "state_key", state_key)

    if "content" not in pdu:
        raise InvalidPDU("content", "is missing")
    if type(pdu["content"]) is not dict:
        raise InvalidPDU("content", "must be an object")

    _require_int(pdu, "origin_server_ts")
    depth = _require_int(pdu, "depth")
    if depth < 0:
        raise InvalidPDU("depth", "must not be negative")

    _check_event_refs(room_version, pdu, "prev_events")
    _check_event_refs(room_version, pdu, "auth_events")

    if "hashes" not in pdu:
        raise InvalidPDU("hashes", "is missing")
    hashes = pdu["hashes"]
    if type(hashes) is not dict:
        raise InvalidPDU("hashes", "must be an object")
    if type(hashes.get("sha256")) is not str:
        raise InvalidPDU("hashes.sha256", "must be a string")

    if "signatures" not in pdu:
        raise InvalidPDU("signatures", "is missing")
    signatures = pdu["signatures"]
    if type(signatures) is not dict:
        raise InvalidPDU("signatures", "must be an object")
    for server, by_key in signatures.items():
        if type(by_key) is not dict:
            raise InvalidPDU(f"signatures.{server}", "must be an object")
        for key_id, sig in by_key.items():
            if type(sig) is not str:
                raise InvalidPDU(f"signatures.{server}.{key_id}", "must be a string")

    if "unsigned" in pdu and type(pdu["unsigned"]) is not dict:
        raise InvalidPDU("unsigned", "must be an object")
    if "redacts" in pdu and type(pdu["redacts"]) is not str:
        raise InvalidPDU("redacts", "must be a string")

    return pdu

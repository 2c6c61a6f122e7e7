"""Content hashes, reference hashes, event IDs and (room v12) room IDs.

Spec: Server-Server API, "Calculating the content hash for an event" and "Calculating
the reference hash for an event"; room versions 3, 4 and 12 for the ID formats.

* content hash: sha256 of the canonical JSON of the full event without ``unsigned``,
  ``signatures`` and ``hashes``. (Synapse also strips top-level ``age_ts``, ``outlier``
  and ``destinations``, its legacy internal keys; the spec does not, and nor do we.)
* reference hash: sha256 of the canonical JSON of the *redacted* event without
  ``signatures`` and ``unsigned``. The same bytes are what servers sign, so
  ``redacted_signing_bytes`` is shared with ``event_signing``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from unpaddedbase64 import decode_base64, encode_base64

from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.ids import EventID, RoomID
from warden.matrix.redaction import redact_event
from warden.matrix.room_versions import EventFormat, RoomVersion, get_room_version

__all__ = [
    "EventIDError",
    "add_content_hash",
    "check_content_hash",
    "compute_content_hash",
    "compute_event_id",
    "compute_reference_hash",
    "covered_event",
    "event_id_from_reference_hash",
    "redacted_signing_bytes",
    "room_id_from_create_event",
]

_NOT_HASHED = frozenset({"unsigned", "signatures", "hashes"})


def covered_event(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` as its hashes and signatures cover it: without the top-level
    ``unsigned`` and ``signatures``.

    Neither the content hash, the reference hash (the event ID from room version 3) nor
    any signature covers those two keys, so anyone relaying the event can change them;
    whatever judges the event must not see them. Returns ``event`` itself when it has
    neither key, else a shallow copy without them.
    """
    if "unsigned" not in event and "signatures" not in event:
        return event
    return {k: v for k, v in event.items() if k != "unsigned" and k != "signatures"}


class EventIDError(ValueError):
    """The event ID cannot be determined: missing or malformed in a v1/v2 event."""


def compute_content_hash(event: Mapping[str, Any]) -> bytes:
    """The sha256 content hash of ``event`` (raw 32 bytes).

    Raises ``CanonicalJSONError`` if the event holds values canonical JSON forbids.
    """
    hashed = {k: v for k, v in event.items() if k not in _NOT_HASHED}
    return hashlib.sha256(encode_canonical_json(hashed)).digest()


def add_content_hash(event: dict[str, Any]) -> str:
    """Set ``event["hashes"]["sha256"]`` to the content hash; return it (unpadded base64).

    Other algorithms already in ``hashes`` are left alone.
    """
    digest = encode_base64(compute_content_hash(event))
    hashes = event.get("hashes")
    if isinstance(hashes, dict):
        hashes["sha256"] = digest
    else:
        event["hashes"] = {"sha256": digest}
    return digest


def check_content_hash(event: Mapping[str, Any]) -> bool:
    """Whether ``event["hashes"]["sha256"]`` matches the event's content hash.

    False (never an exception) when ``hashes`` is missing, malformed or not base64, or
    the event is not canonical JSON. Like Synapse, padded and URL-safe base64 are
    accepted.
    """
    hashes = event.get("hashes")
    if not isinstance(hashes, Mapping):
        return False
    claimed = hashes.get("sha256")
    if not isinstance(claimed, str):
        return False
    try:
        claimed_bytes = decode_base64(claimed)
        computed = compute_content_hash(event)
    except ValueError:  # binascii.Error, UnicodeEncodeError, CanonicalJSONError
        return False
    return claimed_bytes == computed


def redacted_signing_bytes(room_version: RoomVersion, event: Mapping[str, Any]) -> bytes:
    """Canonical JSON of the redacted event without ``signatures`` and ``unsigned``.

    The reference hash is its sha256 and event signatures are made over it.
    """
    redacted = redact_event(room_version, event)
    redacted.pop("signatures", None)
    # redact_event already drops ``unsigned``; nothing else to strip.
    return encode_canonical_json(redacted)


def compute_reference_hash(room_version: RoomVersion, event: Mapping[str, Any]) -> bytes:
    """The sha256 reference hash of ``event`` (raw 32 bytes)."""
    return hashlib.sha256(redacted_signing_bytes(room_version, event)).digest()


def event_id_from_reference_hash(room_version: RoomVersion, reference_hash: bytes) -> EventID:
    """``$`` + the reference hash in the room version's base64 alphabet (v3 and later)."""
    if room_version.event_format is EventFormat.V1_V2:
        raise EventIDError(
            f"room version {room_version.identifier} event IDs are not reference hashes"
        )
    urlsafe = room_version.event_format is not EventFormat.V3
    return EventID("$" + encode_base64(reference_hash, urlsafe=urlsafe))


def compute_event_id(room_version: RoomVersion, event: Mapping[str, Any]) -> EventID:
    """The ID of ``event``: its ``event_id`` key in v1/v2, its reference hash from v3.

    Raises ``EventIDError`` if a v1/v2 event has no well-formed ``event_id``
    (``$localpart:server``).
    """
    if room_version.event_format is EventFormat.V1_V2:
        event_id = event.get("event_id")
        if not isinstance(event_id, str):
            raise EventIDError(
                f"room version {room_version.identifier} events must carry an 'event_id' string"
            )
        _, sep, server = event_id.partition(":")
        if not event_id.startswith("$") or not sep or not server:
            raise EventIDError(f"malformed event_id {event_id!r}: expected '$opaque:server'")
        return EventID(event_id)
    return event_id_from_reference_hash(room_version, compute_reference_hash(room_version, event))


def room_id_from_create_event(
    create_event: Mapping[str, Any], room_version: RoomVersion | None = None
) -> RoomID:
    """The room ID a (room version 12+) ``m.room.create`` event defines.

    ``!`` + the URL-safe unpadded base64 reference hash of the create event (MSC4291).
    Without ``room_version`` the create event's ``content.room_version`` is used (the
    spec's default is ``"1"``). Raises ``ValueError`` if that room version does not derive
    room IDs from the create event, or ``UnknownRoomVersionError`` if it is unknown.
    """
    if room_version is None:
        content = create_event.get("content")
        identifier = content.get("room_version", "1") if isinstance(content, Mapping) else "1"
        room_version = get_room_version(identifier)
    if not room_version.room_ids_as_hashes:
        raise ValueError(
            f"room version {room_version.identifier} does not derive room IDs from the create event"
        )
    if create_event.get("type") != "m.room.create":
        raise ValueError("not an m.room.create event")
    digest = compute_reference_hash(room_version, create_event)
    return RoomID("!" + encode_base64(digest, urlsafe=True))

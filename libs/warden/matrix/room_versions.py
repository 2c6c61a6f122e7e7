"""Room versions 1 to 12 and the facts about each that event handling depends on.

The flags follow Synapse's ``synapse.api.room_versions`` (held against it in
``tests/matrix/test_room_versions.py``); the spec's room version pages describe the same
changes. Only stable versions are known: an unknown identifier is refused rather than
guessed at, because hashing or redacting with the wrong rules produces wrong signatures.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from warden.matrix.errors import UnsupportedRoomVersion

__all__ = [
    "KNOWN_ROOM_VERSIONS",
    "EventFormat",
    "RoomVersion",
    "UnknownRoomVersionError",
    "get_room_version",
]


class EventFormat(enum.IntEnum):
    """How events identify themselves and their room (Synapse's ``EventFormatVersions``)."""

    V1_V2 = 1
    """``event_id`` is a key of the event JSON, ``$opaque:server``; prev/auth events are
    ``[event_id, {hashes}]`` pairs."""
    V3 = 2
    """Event ID is ``$`` + the reference hash in standard unpadded base64."""
    V4_PLUS = 3
    """Event ID is ``$`` + the reference hash in URL-safe unpadded base64."""
    V12_PLUS = 4
    """As ``V4_PLUS``; the room ID is ``!`` + the create event's reference hash and the
    create event has no ``room_id`` (MSC4291)."""


@dataclass(frozen=True, slots=True)
class RoomVersion:
    """What distinguishes one room version from another for hashing, redaction and checks."""

    identifier: str
    event_format: EventFormat
    enforce_key_validity: bool
    """Keys must be valid at ``origin_server_ts`` when checking signatures (v5+)."""
    special_case_aliases_auth: bool
    """``m.room.aliases`` has its own auth and keeps ``aliases`` on redaction (v1-v5)."""
    strict_canonicaljson: bool
    """Floats and integers outside [-(2**53)+1, 2**53-1] make an event invalid (v6+)."""
    limit_notifications_power_levels: bool
    """``notifications`` in power levels is checked by auth (v6+)."""
    implicit_room_creator: bool
    """``m.room.create`` has no ``creator``; the sender is the creator (v11+)."""
    updated_redaction_rules: bool
    """MSC2176 redaction rules (v11+): create keeps all content, ``redacts`` kept in
    content, power levels keep ``invite``, ``third_party_invite.signed`` kept, top-level
    ``origin``/``membership``/``prev_state`` no longer kept."""
    restricted_join_rule: bool
    """The ``restricted`` join rule; join rules keep ``allow`` on redaction (v8+)."""
    restricted_join_rule_fix: bool
    """Members keep ``join_authorised_via_users_server`` on redaction (v9+)."""
    knock_join_rule: bool
    """The ``knock`` join rule (v7+)."""
    knock_restricted_join_rule: bool
    """The ``knock_restricted`` join rule (v10+)."""
    enforce_int_power_levels: bool
    """Power level values must be integers, not strings (v10+)."""
    strict_event_byte_limits: bool
    """Size limits on event keys are counted in bytes, not code points (v11+ in Synapse)."""
    creator_power: bool
    """MSC4289: room creators have infinite power (v12+)."""
    room_ids_as_hashes: bool
    """MSC4291: the room ID is derived from the create event (v12+)."""

    @property
    def event_id_in_json(self) -> bool:
        """Whether ``event_id`` is carried in the event JSON (v1, v2) rather than derived."""
        return self.event_format is EventFormat.V1_V2


class UnknownRoomVersionError(UnsupportedRoomVersion, ValueError):
    """The room version is not one this server knows (``M_UNSUPPORTED_ROOM_VERSION``)."""


def _build() -> dict[str, RoomVersion]:
    versions: dict[str, RoomVersion] = {}
    for n in range(1, 13):
        if n <= 2:
            fmt = EventFormat.V1_V2
        elif n == 3:
            fmt = EventFormat.V3
        elif n <= 11:
            fmt = EventFormat.V4_PLUS
        else:
            fmt = EventFormat.V12_PLUS
        versions[str(n)] = RoomVersion(
            identifier=str(n),
            event_format=fmt,
            enforce_key_validity=n >= 5,
            special_case_aliases_auth=n <= 5,
            strict_canonicaljson=n >= 6,
            limit_notifications_power_levels=n >= 6,
            implicit_room_creator=n >= 11,
            updated_redaction_rules=n >= 11,
            restricted_join_rule=n >= 8,
            restricted_join_rule_fix=n >= 9,
            knock_join_rule=n >= 7,
            knock_restricted_join_rule=n >= 10,
            enforce_int_power_levels=n >= 10,
            strict_event_byte_limits=n >= 11,
            creator_power=n >= 12,
            room_ids_as_hashes=n >= 12,
        )
    return versions


KNOWN_ROOM_VERSIONS: Mapping[str, RoomVersion] = MappingProxyType(_build())
"""The stable room versions, by identifier."""


def get_room_version(identifier: str) -> RoomVersion:
    """Return the ``RoomVersion`` for ``identifier``.

    Raises ``UnknownRoomVersionError`` (an ``M_UNSUPPORTED_ROOM_VERSION`` Matrix error
    and a ``ValueError``) for identifiers that are not stable room versions.
    """
    try:
        return KNOWN_ROOM_VERSIONS[identifier]
    except (KeyError, TypeError):
        raise UnknownRoomVersionError(f"unsupported room version: {identifier!r}") from None

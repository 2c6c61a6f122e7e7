"""The redaction algorithm (spec: Client-Server API, "Redactions"; room version pages).

Redaction keeps the keys that the auth rules and event graph need and drops everything
else. Hashes and signatures are computed over the redacted form, so this must agree
with every other server byte for byte; ``tests/matrix/test_redaction_oracle.py`` holds
it against Synapse's implementation for every room version.

One deliberate difference from Synapse (1.163): Synapse keeps ``unsigned.age_ts`` and
``unsigned.replaces_state`` (its internal bookkeeping); the spec keeps no ``unsigned``
at all, and neither do we. Hashes and signatures strip ``unsigned`` either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from warden.matrix.room_versions import RoomVersion

__all__ = ["redact_event"]

# Top-level keys every room version keeps.
_KEEP_TOP_LEVEL: frozenset[str] = frozenset(
    {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "auth_events",
        "origin_server_ts",
    }
)
# Room versions 1-10 also keep these; MSC2176 (v11) dropped them.
_KEEP_TOP_LEVEL_PRE_V11: frozenset[str] = _KEEP_TOP_LEVEL | {"origin", "membership", "prev_state"}

_POWER_LEVELS_KEYS = (
    "ban",
    "events",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
)


def _keep(content: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: content[k] for k in keys if k in content}


def _redact_content(
    room_version: RoomVersion, event_type: object, content: Mapping[str, Any]
) -> dict[str, Any]:
    """The content keys kept for ``event_type`` (the values are shared, not copied)."""
    updated = room_version.updated_redaction_rules
    if event_type == "m.room.member":
        kept = _keep(content, ("membership",))
        if room_version.restricted_join_rule_fix and "join_authorised_via_users_server" in content:
            kept["join_authorised_via_users_server"] = content["join_authorised_via_users_server"]
        if updated:
            # v11 keeps third_party_invite.signed; like Synapse, an object without
            # "signed" is kept as an empty object and a non-object is dropped.
            invite = content.get("third_party_invite")
            if isinstance(invite, Mapping):
                kept["third_party_invite"] = _keep(invite, ("signed",))
        return kept
    if event_type == "m.room.create":
        if updated:
            return dict(content)
        if not room_version.implicit_room_creator:
            return _keep(content, ("creator",))
        return {}
    if event_type == "m.room.join_rules":
        if room_version.restricted_join_rule:
            return _keep(content, ("join_rule", "allow"))
        return _keep(content, ("join_rule",))
    if event_type == "m.room.power_levels":
        kept = _keep(content, _POWER_LEVELS_KEYS)
        if updated and "invite" in content:
            kept["invite"] = content["invite"]
        return kept
    if event_type == "m.room.aliases":
        if room_version.special_case_aliases_auth:
            return _keep(content, ("aliases",))
        return {}
    if event_type == "m.room.history_visibility":
        return _keep(content, ("history_visibility",))
    if event_type == "m.room.redaction" and updated:
        return _keep(content, ("redacts",))
    return {}


def redact_event(room_version: RoomVersion, event: Mapping[str, Any]) -> dict[str, Any]:
    """Return the redacted form of ``event`` under ``room_version``'s rules.

    The result is a new top-level dict with a new ``content`` dict; nested values are
    shared with ``event`` (not deep-copied), so treat the result as read-only or copy
    it before mutating nested values. ``event`` itself is not modified. A missing or
    non-object ``content`` redacts to ``{}``.
    """
    keep = _KEEP_TOP_LEVEL_PRE_V11 if not room_version.updated_redaction_rules else _KEEP_TOP_LEVEL
    redacted = {k: v for k, v in event.items() if k in keep}
    event_type = event.get("type")
    if room_version.room_ids_as_hashes and event_type == "m.room.create":
        # v12 create events have no room_id (their hash *is* the room ID); Synapse
        # drops a stray one on redaction, so do we. validate_pdu refuses such events.
        redacted.pop("room_id", None)
    content = event.get("content")
    redacted["content"] = (
        _redact_content(room_version, event_type, content) if isinstance(content, Mapping) else {}
    )
    return redacted

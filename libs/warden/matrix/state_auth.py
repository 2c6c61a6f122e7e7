"""The room auth rules, as far as Warden's learned state can check them.

Warden keeps no room DAG and runs no state resolution, so it cannot run the spec's
auth rules in full. What it can check against its learned state (members and their
memberships, power levels, join rules, the create event) is enough to keep a server
from writing state it could never write in the real room: the sender must be a
joined member with the power the event type needs, membership changes follow the
membership rules (a join needs the join rule or an invite and no ban, a kick or ban
needs more power than the target's, ...), member state keys must be user IDs.

``check_event`` is pure: the caller loads an ``AuthState`` for the event and decides
what a refusal means (the room-state consumer neither learns nor judges the event).
Rules Warden cannot check (third-party invite tokens, restricted join conditions
beyond the authorising user, the details of ``notifications``) are checked
conservatively: when in doubt the event is not learned, and the periodic refresh,
which replaces state from a trusted server's snapshot, fills the gap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warden.matrix.room_versions import RoomVersion

MEMBER = "m.room.member"
POWER_LEVELS = "m.room.power_levels"
CREATE = "m.room.create"

# A user ID as the spec's grammar allows it (historical localparts included): "@",
# a non-empty localpart without ":", ":", and a server name. 255 bytes at most.
_USER_ID = re.compile(r"@[^:\x00-\x20\x7f]+:[A-Za-z0-9.\-\[\]:]+")
MAX_USER_ID_BYTES = 255

INFINITE = math.inf


def is_valid_user_id(value: object) -> bool:
    """Whether ``value`` is a syntactically valid Matrix user ID."""
    return (
        isinstance(value, str)
        and len(value.encode("utf-8")) <= MAX_USER_ID_BYTES
        and _USER_ID.fullmatch(value) is not None
    )


def server_of(user_id: str) -> str:
    """The server part of a user ID ("" when it has none)."""
    _, _, server = user_id.partition(":")
    return server


@dataclass(frozen=True)
class AuthState:
    """What the learned state says about one event's sender and target."""

    room_version: RoomVersion
    create: Mapping[str, Any] | None  # content of m.room.create
    create_sender: str
    power_levels: Mapping[str, Any] | None
    join_rule: str | None
    sender_membership: str | None
    target_membership: str | None = None  # m.room.member: the state key's membership
    # m.room.member joins with join_authorised_via_users_server: that user's membership.
    authoriser_membership: str | None = None

    @property
    def creators(self) -> frozenset[str]:
        """Room version 12 creators (infinite power); empty before."""
        if not self.room_version.creator_power or self.create is None:
            return frozenset()
        found = {self.create_sender} if self.create_sender else set()
        extra = self.create.get("additional_creators")
        if isinstance(extra, list):
            found.update(u for u in extra if isinstance(u, str))
        return frozenset(found)

    def _legacy_creator(self) -> str:
        if self.create is None:
            return ""
        if self.room_version.implicit_room_creator:
            return self.create_sender
        creator = self.create.get("creator")
        return creator if isinstance(creator, str) else self.create_sender

    def user_level(self, user_id: str) -> float:
        """The user's power level (infinite for v12 creators)."""
        if user_id in self.creators:
            return INFINITE
        pl = self.power_levels
        if pl is None:
            # Without power levels, the creator has 100 and everyone else 0.
            return 100 if user_id and user_id == self._legacy_creator() else 0
        users = pl.get("users")
        if isinstance(users, Mapping) and user_id in users:
            level = _as_int(users[user_id], self.room_version)
            if level is not None:
                return level
        return _level(pl, "users_default", 0, self.room_version)

    def required(self, key: str, default_with_pl: int) -> int:
        """A top-level level (``ban``, ``kick``, ``invite``, ``redact``...)."""
        if self.power_levels is None:
            return 0 if key == "invite" else 50 if key in ("ban", "kick", "redact") else 0
        return _level(self.power_levels, key, default_with_pl, self.room_version)

    def event_level(self, event_type: str, is_state: bool) -> int:
        """The level needed to send an event of ``event_type``."""
        pl = self.power_levels
        if pl is None:
            return 0
        events = pl.get("events")
        if isinstance(events, Mapping) and event_type in events:
            level = _as_int(events[event_type], self.room_version)
            if level is not None:
                return level
        if is_state:
            return _level(pl, "state_default", 50, self.room_version)
        return _level(pl, "events_default", 0, self.room_version)


def _as_int(value: object, room_version: RoomVersion) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not room_version.enforce_int_power_levels and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _level(pl: Mapping[str, Any], key: str, default: int, room_version: RoomVersion) -> int:
    level = _as_int(pl.get(key), room_version) if key in pl else None
    return default if level is None else level


def check_event(event: Mapping[str, Any], state: AuthState) -> str | None:
    """Why ``event`` fails the auth rules against ``state``; None when it passes."""
    event_type = event.get("type")
    sender = event.get("sender")
    if not isinstance(event_type, str) or not is_valid_user_id(sender):
        return "malformed event"
    assert isinstance(sender, str)
    if event_type == CREATE:
        return "the room already has a create event"
    state_key = event.get("state_key")
    content = event.get("content")
    if not isinstance(content, Mapping):
        content = {}
    if event_type == MEMBER:
        if not isinstance(state_key, str) or not is_valid_user_id(state_key):
            return "m.room.member state key is not a user ID"
        return _check_member(sender, state_key, content, state)
    if state.sender_membership != "join":
        return "sender is not a joined member"
    is_state = isinstance(state_key, str)
    if isinstance(state_key, str) and state_key.startswith("@") and state_key != sender:
        return "state key names another user"
    sender_level = state.user_level(sender)
    if sender_level < state.event_level(event_type, is_state):
        return "sender lacks the power level for this event type"
    if event_type == POWER_LEVELS and is_state:
        return _check_power_levels(sender, sender_level, content, state)
    return None


def _check_member(
    sender: str, target: str, content: Mapping[str, Any], state: AuthState
) -> str | None:
    membership = content.get("membership")
    current = state.target_membership
    sender_current = state.sender_membership
    if membership == "join":
        if sender != target:
            return "a join must be sent by the joining user"
        if current == "ban":
            return "the user is banned"
        if current in ("join", "invite"):
            return None
        rule = state.join_rule
        if rule == "public":
            return None
        restricted = ("restricted", "knock_restricted")
        if rule in restricted and state.room_version.restricted_join_rule:
            authoriser = content.get("join_authorised_via_users_server")
            if (
                isinstance(authoriser, str)
                and state.authoriser_membership == "join"
                and state.user_level(authoriser) >= state.required("invite", 0)
            ):
                return None
        return "the join rule does not let this user join"
    if membership == "invite":
        if sender_current != "join":
            return "the inviter is not a joined member"
        if current in ("join", "ban"):
            return "the invited user is joined or banned"
        if state.user_level(sender) < state.required("invite", 0):
            return "the inviter lacks the invite power level"
        return None
    if membership == "leave":
        if sender == target:
            if current in ("join", "invite", "knock"):
                return None
            return "the user is not in the room"
        if sender_current != "join":
            return "the sender is not a joined member"
        sender_level = state.user_level(sender)
        if current == "ban" and sender_level < state.required("ban", 50):
            return "unbanning needs the ban power level"
        if sender_level >= state.required("kick", 50) and state.user_level(target) < sender_level:
            return None
        return "kicking needs the kick level and more power than the target's"
    if membership == "ban":
        if sender_current != "join":
            return "the sender is not a joined member"
        sender_level = state.user_level(sender)
        if sender_level >= state.required("ban", 50) and state.user_level(target) < sender_level:
            return None
        return "banning needs the ban level and more power than the target's"
    if membership == "knock":
        rule = state.join_rule
        allowed = (rule == "knock" and state.room_version.knock_join_rule) or (
            rule == "knock_restricted" and state.room_version.knock_restricted_join_rule
        )
        if not allowed:
            return "the join rule does not allow knocking"
        if sender != target:
            return "a knock must be sent by the knocking user"
        if current in ("ban", "invite", "join"):
            return "the user cannot knock now"
        return None
    return "unknown membership"


def _check_power_levels(
    sender: str, sender_level: float, content: Mapping[str, Any], state: AuthState
) -> str | None:
    """The spec's power level change rules (what changes must stay within the sender's
    own level; nobody may change the level of a user at or above their own)."""
    version = state.room_version
    users = content.get("users", {})
    if not isinstance(users, Mapping) or not all(is_valid_user_id(u) for u in users):
        return "power levels: 'users' must map user IDs to levels"
    if version.enforce_int_power_levels:
        for key, value in content.items():
            if key in ("users", "events", "notifications"):
                if isinstance(value, Mapping) and any(
                    _as_int(v, version) is None for v in value.values()
                ):
                    return f"power levels: '{key}' values must be integers"
            elif key in _TOP_LEVEL and _as_int(value, version) is None:
                return f"power levels: '{key}' must be an integer"
    if version.creator_power and any(u in state.creators for u in users):
        return "power levels: creators cannot be listed"
    old = state.power_levels
    if old is None:
        return None  # the room's first power levels: only the create rules constrain it
    for key, default in _TOP_LEVEL.items():
        before = _level(old, key, default, version) if key in old else None
        after = _level(content, key, default, version) if key in content else None
        if before != after and max(b for b in (before, after) if b is not None) > sender_level:
            return f"power levels: cannot change '{key}' beyond the sender's level"
    for section in ("events", "notifications"):
        if _section_change_too_high(old, content, section, sender_level, version):
            return f"power levels: cannot change '{section}' beyond the sender's level"
    old_users = old.get("users", {})
    old_users = old_users if isinstance(old_users, Mapping) else {}
    for user in set(old_users) | set(users):
        before = _as_int(old_users.get(user), version) if user in old_users else None
        after = _as_int(users.get(user), version) if user in users else None
        if before == after:
            continue
        if before is not None and user != sender and before >= sender_level:
            return "power levels: cannot change the level of a user at or above the sender's"
        if max(v for v in (before, after) if v is not None) > sender_level:
            return "power levels: cannot raise a level above the sender's"
    return None


_TOP_LEVEL = {
    "users_default": 0,
    "events_default": 0,
    "state_default": 50,
    "ban": 50,
    "redact": 50,
    "kick": 50,
    "invite": 0,
}


def _section_change_too_high(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    section: str,
    sender_level: float,
    version: RoomVersion,
) -> bool:
    before_map = old.get(section, {})
    after_map = new.get(section, {})
    before_map = before_map if isinstance(before_map, Mapping) else {}
    after_map = after_map if isinstance(after_map, Mapping) else {}
    for key in set(before_map) | set(after_map):
        before = _as_int(before_map.get(key), version) if key in before_map else None
        after = _as_int(after_map.get(key), version) if key in after_map else None
        if before == after:
            continue
        if max((v for v in (before, after) if v is not None), default=0) > sender_level:
            return True
    return False

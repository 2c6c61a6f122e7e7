"""The self-directed, creator and power-level trust sources, and the room data they read.

Each source returns a ``Tristate``. The room-derived ones read the room's learned
``m.room.create`` and ``m.room.power_levels`` (``warden.storage.room_state``), never
anything an event or a remote server merely claims; policyserv instead stored power
levels and creators taken on a trusted origin's word in ``trust_data``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from warden.filters.link import star_glob_matches
from warden.matrix.room_versions import RoomVersion
from warden.matrix.state_auth import AuthState
from warden.storage.room_state import CREATE, POWER_LEVELS


class Tristate(enum.Enum):
    """A source's answer."""

    TRUE = "true"  # trusted
    FALSE = "false"  # untrusted, whatever other sources say
    DEFAULT = "default"  # no opinion


def self_directed(user_id: str, allowed: Sequence[str], denied: Sequence[str]) -> Tristate:
    """The community's own globs (policyserv's go-glob: ``*`` is the only wildcard):
    a denied match is FALSE (deny wins), else an allowed match is TRUE."""
    if any(star_glob_matches(g, user_id) for g in denied):
        return Tristate.FALSE
    if any(star_glob_matches(g, user_id) for g in allowed):
        return Tristate.TRUE
    return Tristate.DEFAULT


def muninn(user_id: str, servers: frozenset[str]) -> Tristate:
    """TRUE when the user's server is a Muninn Hall member."""
    _, sep, server = user_id.partition(":")
    return Tristate.TRUE if sep and server in servers else Tristate.DEFAULT


@dataclass(frozen=True)
class RoomTrustState:
    """The learned create event and power levels of one room."""

    create: Mapping[str, Any] | None
    create_sender: str
    power_levels: Mapping[str, Any] | None

    def auth_state(self, room_version: RoomVersion) -> AuthState:
        """The same state as the auth-rule checks see it."""
        return AuthState(
            room_version=room_version,
            create=self.create,
            create_sender=self.create_sender,
            power_levels=self.power_levels,
            join_rule=None,
            sender_membership=None,
        )


EMPTY_ROOM = RoomTrustState(None, "", None)


def creator(user_id: str, state: AuthState) -> Tristate:
    """TRUE for a room version 12+ creator (the create event's sender and
    ``additional_creators``); earlier versions have no privileged creators."""
    return Tristate.TRUE if user_id in state.creators else Tristate.DEFAULT


def power_levels(user_id: str, state: AuthState) -> Tristate:
    """TRUE when the user's level (their entry, else ``users_default``) is at least
    ``state_default`` (policyserv's rule); no learned power levels: no opinion."""
    if state.power_levels is None:
        return Tristate.DEFAULT
    if state.user_level(user_id) >= state.required("state_default", 50):
        return Tristate.TRUE
    return Tristate.DEFAULT


async def load_room_trust_state(pool: asyncpg.Pool, room_id: str) -> RoomTrustState:
    """The room's learned create event and power levels (one query)."""
    rows = await pool.fetch(
        """
        SELECT event_type, content, sender FROM room_state_events
        WHERE room_id = $1 AND state_key = '' AND event_type = ANY($2::text[])
        """,
        room_id,
        [CREATE, POWER_LEVELS],
    )
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for row in rows:
        value = orjson.loads(row["content"])
        found[row["event_type"]] = (value if isinstance(value, dict) else {}, row["sender"])
    create = found.get(CREATE)
    pl = found.get(POWER_LEVELS)
    return RoomTrustState(
        create=create[0] if create else None,
        create_sender=create[1] if create else "",
        power_levels=pl[0] if pl else None,
    )


class RoomTrustCache:
    """Learned create events and power levels per room, cached briefly in process.

    Read only for media events of communities with the untrusted-media filter on; a few
    seconds of staleness (a demotion taking effect up to ``ttl_seconds`` late) saves a
    query per image in a busy room.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float = 5.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, RoomTrustState]] = {}

    async def get(self, room_id: str) -> RoomTrustState:
        """The room's learned create event and power levels."""
        now = time.monotonic()
        hit = self._entries.get(room_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        state = await load_room_trust_state(self._pool, room_id)
        if len(self._entries) >= self.MAX_ENTRIES:  # bound memory; cheap to reload
            self._entries.clear()
        self._entries[room_id] = (now + self._ttl, state)
        return state

"""Learned room state: what Warden knows of each protected room from federation.

Three writers share this module: the room-state consumer applies one PDU at a time
(``apply_event``), the join code seeds a room from a send_join response
(``seed_from_state``), and the periodic refresh replaces a room's state with a trusted
origin's ``GET /state`` answer (``replace_state``, the same code). Readers: the policy
list filter (``get_policy_rules``), the admin API (``get_policy_server``), and whoever
needs power levels, creators or the server ACL.

Not authoritative: there is no state resolution. Of two versions of one state entry
the one with the greater ``depth`` wins (ties: the later write), which is right for a
linear room and wrong only across forks; the refresh corrects what drifts. Members and
display names go to the ``displaynames`` table (every joined member, with ``""`` when
they have no display name, so the mentions filter counts user-ID mentions of nameless
members too; policyserv keeps only members with names).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import Counter

from warden.matrix.event_hashes import compute_event_id
from warden.matrix.globs import compile_glob, glob_rejection
from warden.matrix.room_versions import RoomVersion, get_room_version
from warden.matrix.third_party_invite import THIRD_PARTY_INVITE

Connection = asyncpg.Connection | PoolConnectionProxy

CREATE = "m.room.create"
POWER_LEVELS = "m.room.power_levels"
SERVER_ACL = "m.room.server_acl"
POLICY = "m.room.policy"
MEMBER = "m.room.member"

# Moderation policy rule types (spec: "Moderation policy lists"), with the legacy types
# older list managers (Mjolnir, Draupnir) still publish.
RULE_TYPES: Mapping[str, str] = {
    "m.policy.rule.user": "user",
    "m.policy.rule.server": "server",
    "m.policy.rule.room": "room",
    "m.room.rule.user": "user",
    "m.room.rule.server": "server",
    "m.room.rule.room": "room",
    "org.matrix.mjolnir.rule.user": "user",
    "org.matrix.mjolnir.rule.server": "server",
    "org.matrix.mjolnir.rule.room": "room",
}
# Recommendations that mean "keep this entity out": the spec's m.ban, Mjolnir's legacy
# spelling, and takedowns (MSC4204), which are bans and more.
BAN_RECOMMENDATIONS = frozenset(
    {"m.ban", "org.matrix.mjolnir.ban", "m.takedown", "org.matrix.msc4204.takedown"}
)

# State events kept in ``room_state_events`` (members go to ``displaynames``).
# ``m.room.third_party_invite`` (state key: the invite's token) holds the public keys a
# third-party-invite membership event is checked against (``get_third_party_invite``).
TRACKED_TYPES = frozenset(
    {CREATE, POWER_LEVELS, SERVER_ACL, POLICY, THIRD_PARTY_INVITE, *RULE_TYPES}
)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class PolicyServerState:
    """What the room's ``m.room.policy`` (state key ``""``) says about Warden."""

    via: str | None = None
    public_key: str | None = None
    uses_warden: bool = False
    key_matches: bool = False

    def to_api(self) -> dict[str, Any]:
        """The admin API's ``policy_server`` object."""
        return {
            "uses_warden": self.uses_warden,
            "via": self.via,
            "public_key": self.public_key,
            "key_matches": self.key_matches,
        }


@dataclass(frozen=True)
class PolicyRule:
    """One ban rule of a policy list room."""

    room_id: str  # the policy list room
    kind: str  # "user", "server" or "room"
    entity: str  # a glob: * any run of characters, ? one character
    recommendation: str
    reason: str = ""

    def matches(self, value: str) -> bool:
        """Whether ``value`` matches the entity glob (server names case-insensitively).

        Bounded time whatever the glob (``warden.matrix.globs``)."""
        if self.kind == "server":
            return compile_glob(self.entity.lower()).matches(value.lower())
        return compile_glob(self.entity).matches(value)


# Counted where rules are learned (``apply_event``, ``seed_from_state``); the event is
# still stored (it replaces whatever rule held its state key) but never becomes a rule.
POLICY_RULES_REJECTED = Counter(
    "warden_policy_rules_rejected_total",
    "Policy rule events learned whose entity glob is refused, by reason (entity_too_long, "
    "too_many_wildcards); such a rule bans nobody.",
    ["reason"],
)


def note_rejected_rule(event_type: str, content: Mapping[str, Any]) -> None:
    """Count a policy rule event whose entity no matcher will ever see (see above)."""
    if event_type in RULE_TYPES:
        entity = content.get("entity")
        if isinstance(entity, str) and (reason := glob_rejection(entity)) is not None:
            POLICY_RULES_REJECTED.labels(reason).inc()


def parse_rule(room_id: str, event_type: str, content: Mapping[str, Any]) -> PolicyRule | None:
    """The ban rule a policy rule event's content holds, or None (removed, not a ban,
    malformed, or an entity over the caps of ``warden.matrix.globs.glob_rejection``)."""
    kind = RULE_TYPES.get(event_type)
    entity = content.get("entity")
    recommendation = content.get("recommendation")
    if kind is None or not isinstance(entity, str) or not entity:
        return None
    if glob_rejection(entity) is not None:  # too long or too many wildcards to be meant
        return None
    if recommendation not in BAN_RECOMMENDATIONS:
        return None
    reason = content.get("reason")
    return PolicyRule(
        room_id,
        kind,
        entity,
        str(recommendation),
        reason if isinstance(reason, str) else "",
    )


def policy_server_state(
    content: Mapping[str, Any] | None, our_server_name: str, our_public_key: str
) -> PolicyServerState:
    """Interpret an ``m.room.policy`` content (None: no such event learned).

    As Synapse reads it: a string ``via`` and a string ``public_keys.ed25519``; anything
    else (``{}`` included) means no policy server.
    """
    if content is None:
        return PolicyServerState()
    via = content.get("via")
    keys = content.get("public_keys")
    key = keys.get("ed25519") if isinstance(keys, Mapping) else None
    via_s = via if isinstance(via, str) else None
    key_s = key if isinstance(key, str) else None
    uses = via_s is not None and via_s == our_server_name
    return PolicyServerState(
        via=via_s,
        public_key=key_s,
        uses_warden=uses,
        key_matches=uses and key_s == our_public_key,
    )


def creators_from_create(
    room_version: RoomVersion, content: Mapping[str, Any], sender: str
) -> list[str]:
    """The room's creators: from room version 12 (MSC4289), the create event's sender
    plus ``additional_creators``; before that there are no privileged creators."""
    if not room_version.creator_power:
        return []
    creators = [sender] if sender else []
    extra = content.get("additional_creators")
    if isinstance(extra, list):
        creators.extend(u for u in extra if isinstance(u, str) and u not in creators)
    return creators


# --- writing ---------------------------------------------------------------------


@dataclass(frozen=True)
class StateUpdate:
    """What applying one event changed (``kind`` labels the metric)."""

    kind: str  # "member", "power_levels", "create", "server_acl", "policy", "policy_rule"
    own_membership: str | None = None  # Warden's user's new membership, when it changed


def _kind_of(event_type: str) -> str:
    if event_type in RULE_TYPES:
        return "policy_rule"
    return {
        CREATE: "create",
        POWER_LEVELS: "power_levels",
        SERVER_ACL: "server_acl",
        POLICY: "policy",
        THIRD_PARTY_INVITE: "third_party_invite",
    }.get(event_type, "other")


def _depth(event: Mapping[str, Any]) -> int:
    depth = event.get("depth")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else 0


def _displayname(content: Mapping[str, Any]) -> str:
    name = content.get("displayname")
    return name.strip() if isinstance(name, str) else ""


async def _ensure_row(conn: Connection, room_id: str) -> None:
    await conn.execute(
        "INSERT INTO room_state (room_id, updated_ts) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        room_id,
        _now_ms(),
    )


async def _touch(conn: Connection, room_id: str, now: int) -> None:
    # The admin API's last_cached_state_timestamp.
    await conn.execute(
        "UPDATE rooms SET last_state_update_ts = $2 WHERE room_id = $1", room_id, now
    )
    await conn.execute("UPDATE room_state SET updated_ts = $2 WHERE room_id = $1", room_id, now)


async def apply_event(
    pool: asyncpg.Pool,
    room_id: str,
    event: Mapping[str, Any],
    event_id: str,
    *,
    our_user_id: str = "",
) -> StateUpdate | None:
    """Learn from one PDU of the room; None when it changes nothing Warden keeps.

    Every PDU moves the room's ``last_event_id`` (the refresh's anchor). State events of
    the tracked types replace the stored entry unless it came from a deeper event.
    ``m.room.member`` updates the display names; when it concerns ``our_user_id``, the
    returned update says Warden's new membership.
    """
    state_key = event.get("state_key")
    event_type = event.get("type")
    sender = event.get("sender")
    content = event.get("content")
    if not isinstance(content, Mapping):
        content = {}
    now = _now_ms()
    async with pool.acquire() as conn, conn.transaction():
        await _ensure_row(conn, room_id)
        await conn.execute(
            "UPDATE room_state SET last_event_id = $2 WHERE room_id = $1", room_id, event_id
        )
        if not isinstance(state_key, str) or not isinstance(event_type, str):
            return None
        if event_type == MEMBER:
            return await _apply_member(conn, room_id, state_key, content, sender, our_user_id, now)
        if event_type not in TRACKED_TYPES:
            return None
        if event_type in (POWER_LEVELS, SERVER_ACL, POLICY, CREATE) and state_key != "":
            return None
        note_rejected_rule(event_type, content)
        status = await conn.execute(
            """
            INSERT INTO room_state_events
                (room_id, event_type, state_key, event_id, sender, depth, content)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
            ON CONFLICT (room_id, event_type, state_key) DO UPDATE
                SET event_id = EXCLUDED.event_id, sender = EXCLUDED.sender,
                    depth = EXCLUDED.depth, content = EXCLUDED.content
                WHERE room_state_events.depth <= EXCLUDED.depth
            """,
            room_id,
            event_type,
            state_key,
            event_id,
            sender if isinstance(sender, str) else "",
            _depth(event),
            orjson.dumps(content).decode(),
        )
        if status.endswith(" 0"):
            return None  # an older version of what we hold
        await _touch(conn, room_id, now)
        return StateUpdate(_kind_of(event_type))


async def _apply_member(
    conn: Connection,
    room_id: str,
    user_id: str,
    content: Mapping[str, Any],
    sender: object,
    our_user_id: str,
    now: int,
) -> StateUpdate:
    membership = content.get("membership")
    if membership == "join":
        await conn.execute(
            """
            INSERT INTO displaynames (room_id, user_id, displayname) VALUES ($1, $2, $3)
            ON CONFLICT (room_id, user_id) DO UPDATE SET displayname = EXCLUDED.displayname
            """,
            room_id,
            user_id,
            _displayname(content),
        )
    else:
        await conn.execute(
            "DELETE FROM displaynames WHERE room_id = $1 AND user_id = $2", room_id, user_id
        )
    own: str | None = None
    if our_user_id and user_id == our_user_id and isinstance(membership, str):
        own = membership
        removed_by = sender if membership in ("leave", "ban") and sender != our_user_id else None
        await conn.execute(
            """
            UPDATE room_state SET warden_membership = $2, warden_removed_by = $3
            WHERE room_id = $1
            """,
            room_id,
            membership,
            removed_by if isinstance(removed_by, str) else None,
        )
        if removed_by is not None:
            # Kicked or banned: the join records (0005) must not claim we are in.
            await conn.execute(
                """
                UPDATE room_memberships SET membership = 'leave', updated_ts = $2
                WHERE room_id = $1 AND membership = 'join'
                """,
                room_id,
                now,
            )
    await _touch(conn, room_id, now)
    return StateUpdate("member", own_membership=own)


def _latest_event_id(room_version: RoomVersion, events: Sequence[Mapping[str, Any]]) -> str | None:
    best: tuple[int, str] | None = None
    for ev in events:
        try:
            event_id = str(compute_event_id(room_version, ev))
        except ValueError:
            continue
        key = (_depth(ev), event_id)
        if best is None or key > best:
            best = key
    return best[1] if best else None


async def seed_from_state(
    pool: asyncpg.Pool,
    room_id: str,
    room_version: str,
    state_events: Iterable[Mapping[str, Any]],
    *,
    our_user_id: str = "",
    event_id: str | None = None,
) -> int:
    """Replace the room's learned state with a full state snapshot; return the number
    of state events kept.

    For the join code (the ``state`` of a send_join response) and the periodic refresh
    (a ``GET /state`` answer). Whatever the room held before is dropped, display names
    included. Warden's own membership is taken from the snapshot when ``our_user_id``
    is given, else forgotten (a join seeds a room Warden is now in). ``event_id`` is an
    event of the room to anchor later refreshes at (the join event); by default the
    deepest event of the snapshot. The caller vouches for the snapshot: nothing is
    verified here (the refresh checks signatures first).
    """
    version = get_room_version(room_version)
    events = [e for e in state_events if isinstance(e, Mapping)]
    tracked: dict[tuple[str, str], Mapping[str, Any]] = {}
    members: dict[str, str] = {}
    own_membership: str | None = None
    for ev in events:
        event_type, state_key = ev.get("type"), ev.get("state_key")
        if not isinstance(event_type, str) or not isinstance(state_key, str):
            continue
        content = ev.get("content")
        if not isinstance(content, Mapping):
            content = {}
        if event_type == MEMBER:
            if content.get("membership") == "join":
                members[state_key] = _displayname(content)
            if our_user_id and state_key == our_user_id:
                m = content.get("membership")
                own_membership = m if isinstance(m, str) else None
            continue
        if event_type not in TRACKED_TYPES:
            continue
        if event_type in (POWER_LEVELS, SERVER_ACL, POLICY, CREATE) and state_key != "":
            continue
        note_rejected_rule(event_type, content)
        held = tracked.get((event_type, state_key))
        if held is None or _depth(held) <= _depth(ev):
            tracked[(event_type, state_key)] = ev
    rows = []
    for (event_type, state_key), ev in tracked.items():
        try:
            ev_id = str(compute_event_id(version, ev))
        except ValueError:
            continue
        content = ev.get("content")
        sender = ev.get("sender")
        rows.append(
            (
                room_id,
                event_type,
                state_key,
                ev_id,
                sender if isinstance(sender, str) else "",
                _depth(ev),
                orjson.dumps(content if isinstance(content, Mapping) else {}).decode(),
            )
        )
    anchor = event_id or _latest_event_id(version, events)
    now = _now_ms()
    async with pool.acquire() as conn, conn.transaction():
        await _ensure_row(conn, room_id)
        await conn.execute("DELETE FROM room_state_events WHERE room_id = $1", room_id)
        await conn.executemany(
            """
            INSERT INTO room_state_events
                (room_id, event_type, state_key, event_id, sender, depth, content)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
            """,
            rows,
        )
        await conn.execute("DELETE FROM displaynames WHERE room_id = $1", room_id)
        await conn.executemany(
            "INSERT INTO displaynames (room_id, user_id, displayname) VALUES ($1, $2, $3)",
            [(room_id, u, n) for u, n in members.items()],
        )
        await conn.execute(
            """
            UPDATE room_state SET last_event_id = COALESCE($2, last_event_id),
                last_refresh_ts = $3,
                warden_membership = $4::text,
                warden_removed_by = CASE WHEN $4::text IN ('leave', 'ban')
                    THEN warden_removed_by END
            WHERE room_id = $1
            """,
            room_id,
            anchor,
            now,
            own_membership,
        )
        await _touch(conn, room_id, now)
    return len(rows) + len(members)


# Same operation; the name says what the refresh does with it.
replace_state = seed_from_state


# --- reading ---------------------------------------------------------------------


async def _content(
    pool: asyncpg.Pool, room_id: str, event_type: str
) -> tuple[dict[str, Any], str] | None:
    row = await pool.fetchrow(
        """
        SELECT content, sender FROM room_state_events
        WHERE room_id = $1 AND event_type = $2 AND state_key = ''
        """,
        room_id,
        event_type,
    )
    if row is None:
        return None
    content = orjson.loads(row["content"])
    return (content if isinstance(content, dict) else {}), row["sender"]


async def get_policy_server(
    pool: asyncpg.Pool, room_id: str, our_server_name: str, our_public_key: str
) -> PolicyServerState:
    """The room's learned ``m.room.policy`` as seen from our server and policy key."""
    found = await _content(pool, room_id, POLICY)
    return policy_server_state(found[0] if found else None, our_server_name, our_public_key)


async def get_power_levels(pool: asyncpg.Pool, room_id: str) -> dict[str, Any] | None:
    """The content of the room's learned ``m.room.power_levels``, or None."""
    found = await _content(pool, room_id, POWER_LEVELS)
    return found[0] if found else None


async def get_server_acl(pool: asyncpg.Pool, room_id: str) -> dict[str, Any] | None:
    """The content of the room's learned ``m.room.server_acl``, or None."""
    found = await _content(pool, room_id, SERVER_ACL)
    return found[0] if found else None


async def get_creators(pool: asyncpg.Pool, room_id: str, room_version: str) -> list[str]:
    """The room's creators (room version 12 and later; ``[]`` before or when unknown)."""
    found = await _content(pool, room_id, CREATE)
    if found is None:
        return []
    return creators_from_create(get_room_version(room_version), found[0], found[1])


async def get_third_party_invite(
    pool: asyncpg.Pool, room_id: str, token: str
) -> tuple[dict[str, Any], str] | None:
    """The content and sender of the room's learned ``m.room.third_party_invite`` with
    state key ``token``, or None."""
    row = await pool.fetchrow(
        """
        SELECT content, sender FROM room_state_events
        WHERE room_id = $1 AND event_type = $2 AND state_key = $3
        """,
        room_id,
        THIRD_PARTY_INVITE,
        token,
    )
    if row is None:
        return None
    content = orjson.loads(row["content"])
    return (content if isinstance(content, dict) else {}), row["sender"]


async def get_policy_rules(pool: asyncpg.Pool, room_ids: Sequence[str]) -> list[PolicyRule]:
    """The ban rules of the given policy list rooms."""
    if not room_ids:
        return []
    rows = await pool.fetch(
        """
        SELECT room_id, event_type, content FROM room_state_events
        WHERE room_id = ANY($1::text[]) AND event_type = ANY($2::text[])
        """,
        list(room_ids),
        list(RULE_TYPES),
    )
    rules = []
    for row in rows:
        content = orjson.loads(row["content"])
        if isinstance(content, dict):
            rule = parse_rule(row["room_id"], row["event_type"], content)
            if rule is not None:
                rules.append(rule)
    return rules


@dataclass(frozen=True)
class RoomMembershipState:
    """Warden's own standing in a room, as learned."""

    membership: str | None
    removed_by: str | None
    last_event_id: str | None
    last_refresh_ts: int


async def get_membership_state(pool: asyncpg.Pool, room_id: str) -> RoomMembershipState | None:
    """Warden's learned membership and the refresh anchor, or None when nothing learned."""
    row = await pool.fetchrow(
        """
        SELECT warden_membership, warden_removed_by, last_event_id, last_refresh_ts
        FROM room_state WHERE room_id = $1
        """,
        room_id,
    )
    if row is None:
        return None
    return RoomMembershipState(
        row["warden_membership"],
        row["warden_removed_by"],
        row["last_event_id"],
        row["last_refresh_ts"],
    )


@dataclass(frozen=True)
class RefreshTarget:
    """A protected room the periodic refresh can ask about."""

    room_id: str
    room_version: str
    last_event_id: str


async def rooms_to_refresh(pool: asyncpg.Pool) -> list[RefreshTarget]:
    """Protected rooms with a known recent event, where Warden was not removed; the
    least recently refreshed first."""
    rows = await pool.fetch(
        """
        SELECT r.room_id, r.room_version, s.last_event_id
        FROM rooms r JOIN room_state s ON s.room_id = r.room_id
        WHERE s.last_event_id IS NOT NULL
          AND (s.warden_membership IS NULL OR s.warden_membership NOT IN ('leave', 'ban'))
        ORDER BY s.last_refresh_ts, r.room_id
        """
    )
    return [RefreshTarget(r["room_id"], r["room_version"], r["last_event_id"]) for r in rows]

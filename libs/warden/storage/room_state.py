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
from warden.matrix.state_auth import AuthState, is_valid_user_id
from warden.matrix.third_party_invite import THIRD_PARTY_INVITE
from warden.telemetry.metrics import ROOM_STATE_CAP_HITS as CAP_HITS

Connection = asyncpg.Connection | PoolConnectionProxy

CREATE = "m.room.create"
POWER_LEVELS = "m.room.power_levels"
SERVER_ACL = "m.room.server_acl"
POLICY = "m.room.policy"
MEMBER = "m.room.member"
JOIN_RULES = "m.room.join_rules"
NAME = "m.room.name"
TOPIC = "m.room.topic"

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
# The name and topic are what a homeserver's ``user_may_publish_room`` is judged by.
TRACKED_TYPES = frozenset(
    {
        CREATE,
        POWER_LEVELS,
        SERVER_ACL,
        POLICY,
        JOIN_RULES,
        NAME,
        TOPIC,
        THIRD_PARTY_INVITE,
        *RULE_TYPES,
    }
)
# Of those, the types whose only meaningful state key is "".
SINGLETON_TYPES = frozenset({CREATE, POWER_LEVELS, SERVER_ACL, POLICY, JOIN_RULES, NAME, TOPIC})


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
class StateCaps:
    """Per-room bounds on learned state (``PS_ROOM_STATE_MAX_*``)."""

    members: int = 200_000
    displaynames: int = 200_000
    policy_rules: int = 50_000
    displayname_length: int = 256

    @classmethod
    def from_settings(cls, settings: Any) -> StateCaps:
        """The caps a ``Settings`` object names."""
        return cls(
            members=settings.room_state_max_members,
            displaynames=settings.room_state_max_displaynames,
            policy_rules=settings.room_state_max_policy_rules,
            displayname_length=settings.room_state_max_displayname_length,
        )


DEFAULT_CAPS = StateCaps()


@dataclass(frozen=True)
class StateUpdate:
    """What applying one event changed (``kind`` labels the metric)."""

    kind: str  # "member", "power_levels", "create", "server_acl", "policy", "policy_rule",
    # "join_rules"; or "stale" (older than the last verified snapshot), "cap" (not kept)
    own_membership: str | None = None  # Warden's user's new membership, when it changed
    changed: bool = True


def _kind_of(event_type: str) -> str:
    if event_type in RULE_TYPES:
        return "policy_rule"
    return {
        CREATE: "create",
        POWER_LEVELS: "power_levels",
        SERVER_ACL: "server_acl",
        POLICY: "policy",
        THIRD_PARTY_INVITE: "third_party_invite",
        JOIN_RULES: "join_rules",
    }.get(event_type, "other")


def _depth(event: Mapping[str, Any]) -> int:
    depth = event.get("depth")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else 0


def _displayname(
    content: Mapping[str, Any], max_length: int = DEFAULT_CAPS.displayname_length
) -> str:
    name = content.get("displayname")
    if not isinstance(name, str):
        return ""
    name = name.strip()
    if len(name) > max_length:
        # Mentions of such a name are not counted (its user ID still is).
        CAP_HITS.labels("displayname_length").inc()
        return ""
    return name


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


async def _take_slot(conn: Connection, room_id: str, column: str, cap: int) -> bool:
    """Count one more entry of ``column`` for the room unless the cap is reached."""
    row = await conn.fetchval(
        f"UPDATE room_state SET {column} = {column} + 1 WHERE room_id = $1 AND {column} < $2"
        " RETURNING 1",
        room_id,
        cap,
    )
    return row is not None


async def _free_slot(conn: Connection, room_id: str, column: str) -> None:
    await conn.execute(
        f"UPDATE room_state SET {column} = GREATEST({column} - 1, 0) WHERE room_id = $1",
        room_id,
    )


async def apply_event(
    pool: asyncpg.Pool,
    room_id: str,
    event: Mapping[str, Any],
    event_id: str,
    *,
    our_user_id: str = "",
    caps: StateCaps = DEFAULT_CAPS,
) -> StateUpdate | None:
    """Learn from one PDU of the room that the caller verified and authorised; None
    when it changes nothing Warden keeps.

    The PDU becomes the room's ``last_event_id`` (the refresh's anchor): callers pass
    only events whose signatures verified and that passed the auth rules
    (``warden.matrix.state_auth``). State events of the tracked types replace the
    stored entry; ordering (why not ``depth``):

    * ``depth`` is chosen by the sending server: "the greater depth wins" would let one
      event with a huge depth pin its entry against every later legitimate change. So
      depth orders only events whose senders are on the same server (a server can only
      pin an entry against its own later events): an older copy of one server's event,
      delivered late or replayed, does not replace that server's newer one. Between
      servers the last write wins, so another server's later change always can
      replace the entry;
    * an event whose depth is below the deepest state event of the last verified
      snapshot (``trusted_depth``: the join's send_join answer or the refresh) is older
      than what Warden holds and is not learned: a replayed old event (a revoked power
      level, a lifted ban) cannot come back;
    * what arrives out of order from different servers between two snapshots may leave
      an older entry until the next refresh replaces the room's state from a trusted
      server.

    ``m.room.member`` updates memberships and display names; when it concerns
    ``our_user_id``, the returned update says Warden's new membership. New members,
    display names and policy rules past ``caps`` are not kept (``kind`` "cap").
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
        floor = await conn.fetchval(
            "UPDATE room_state SET last_event_id = $2 WHERE room_id = $1 RETURNING trusted_depth",
            room_id,
            event_id,
        )
        if not isinstance(state_key, str) or not isinstance(event_type, str):
            return None
        if event_type != MEMBER and event_type not in TRACKED_TYPES:
            return None
        if _depth(event) < (floor or 0):
            return StateUpdate("stale", changed=False)
        if event_type == MEMBER:
            return await _apply_member(
                conn, room_id, state_key, event, content, sender, event_id, our_user_id, now, caps
            )
        if event_type in SINGLETON_TYPES and state_key != "":
            return None
        note_rejected_rule(event_type, content)
        held_row = await conn.fetchrow(
            """
            SELECT event_id, sender, depth FROM room_state_events
            WHERE room_id = $1 AND event_type = $2 AND state_key = $3 FOR UPDATE
            """,
            room_id,
            event_type,
            state_key,
        )
        held = held_row["event_id"] if held_row is not None else None
        if held == event_id:
            return None  # already learned (a redelivery)
        if held_row is not None and _older_from_same_server(
            event, held_row["sender"].partition(":")[2], held_row["depth"]
        ):
            return StateUpdate("stale", changed=False)
        if (
            held is None
            and event_type in RULE_TYPES
            and not await _take_slot(conn, room_id, "rule_count", caps.policy_rules)
        ):
            CAP_HITS.labels("policy_rule").inc()
            return StateUpdate("cap", changed=False)
        await conn.execute(
            """
            INSERT INTO room_state_events
                (room_id, event_type, state_key, event_id, sender, depth, content)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
            ON CONFLICT (room_id, event_type, state_key) DO UPDATE
                SET event_id = EXCLUDED.event_id, sender = EXCLUDED.sender,
                    depth = EXCLUDED.depth, content = EXCLUDED.content
            """,
            room_id,
            event_type,
            state_key,
            event_id,
            sender if isinstance(sender, str) else "",
            _depth(event),
            orjson.dumps(content).decode(),
        )
        await _touch(conn, room_id, now)
        return StateUpdate(_kind_of(event_type))


def _older_from_same_server(event: Mapping[str, Any], held_server: str, held_depth: int) -> bool:
    """Whether ``event`` is older than the held entry by the same server's reckoning."""
    sender = event.get("sender")
    server = sender.partition(":")[2] if isinstance(sender, str) else ""
    return bool(server) and server == held_server and _depth(event) < held_depth


async def _apply_member(
    conn: Connection,
    room_id: str,
    user_id: str,
    event: Mapping[str, Any],
    content: Mapping[str, Any],
    sender: object,
    event_id: str,
    our_user_id: str,
    now: int,
    caps: StateCaps,
) -> StateUpdate:
    membership = content.get("membership")
    if not isinstance(membership, str):
        return StateUpdate("member", changed=False)
    held = await conn.fetchrow(
        """
        SELECT membership, event_id, sender, depth FROM room_members
        WHERE room_id = $1 AND user_id = $2 FOR UPDATE
        """,
        room_id,
        user_id,
    )
    if held is not None and held["event_id"] == event_id:
        return StateUpdate("member", changed=False)  # a redelivery
    if held is not None and _older_from_same_server(event, held["sender"], held["depth"]):
        return StateUpdate("stale", changed=False)
    sender_server = sender.partition(":")[2] if isinstance(sender, str) else ""
    if membership == "leave":
        if held is not None:
            await conn.execute(
                "DELETE FROM room_members WHERE room_id = $1 AND user_id = $2", room_id, user_id
            )
            await _free_slot(conn, room_id, "member_count")
    elif held is None:
        if not await _take_slot(conn, room_id, "member_count", caps.members):
            CAP_HITS.labels("member").inc()
            return StateUpdate("cap", changed=False)
        await conn.execute(
            """
            INSERT INTO room_members
                (room_id, user_id, server_name, membership, event_id, sender, depth)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            """,
            room_id,
            user_id,
            user_id.partition(":")[2],
            membership,
            event_id,
            sender_server,
            _depth(event),
        )
    else:
        await conn.execute(
            """
            UPDATE room_members SET membership = $3, event_id = $4, sender = $5, depth = $6
            WHERE room_id = $1 AND user_id = $2
            """,
            room_id,
            user_id,
            membership,
            event_id,
            sender_server,
            _depth(event),
        )
    had_name = held is not None and held["membership"] == "join"
    if membership == "join":
        name = _displayname(content, caps.displayname_length)
        if had_name:
            await conn.execute(
                "UPDATE displaynames SET displayname = $3 WHERE room_id = $1 AND user_id = $2",
                room_id,
                user_id,
                name,
            )
        elif await _take_slot(conn, room_id, "displayname_count", caps.displaynames):
            await conn.execute(
                """
                INSERT INTO displaynames (room_id, user_id, displayname) VALUES ($1, $2, $3)
                ON CONFLICT (room_id, user_id) DO UPDATE SET displayname = EXCLUDED.displayname
                """,
                room_id,
                user_id,
                name,
            )
        else:
            CAP_HITS.labels("displayname").inc()
    elif had_name:
        status = await conn.execute(
            "DELETE FROM displaynames WHERE room_id = $1 AND user_id = $2", room_id, user_id
        )
        if status.endswith(" 1"):
            await _free_slot(conn, room_id, "displayname_count")
    own: str | None = None
    if our_user_id and user_id == our_user_id:
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
    caps: StateCaps = DEFAULT_CAPS,
) -> int:
    """Replace the room's learned state with a full state snapshot; return the number
    of state events kept.

    For the join code (the ``state`` of a send_join response) and the periodic refresh
    (a ``GET /state`` answer). Whatever the room held before is dropped, memberships
    and display names included. Warden's own membership is taken from the snapshot
    when ``our_user_id`` is given, else forgotten (a join seeds a room Warden is now
    in). ``event_id`` is an event of the room to anchor later refreshes at (the join
    event); by default the deepest event of the snapshot. It also becomes the trusted
    anchor (``trusted_event_id``), and the snapshot's deepest state event the floor
    below which ``apply_event`` learns nothing.

    The caller verifies the snapshot first (``warden.federation.snapshot``: content
    hashes, signatures, the auth chain); here only member state keys are checked to be
    user IDs, and the caps applied.
    """
    version = get_room_version(room_version)
    events = [e for e in state_events if isinstance(e, Mapping)]
    tracked: dict[tuple[str, str], Mapping[str, Any]] = {}
    member_events: dict[str, Mapping[str, Any]] = {}
    floor = 0
    for ev in events:
        event_type, state_key = ev.get("type"), ev.get("state_key")
        if not isinstance(event_type, str) or not isinstance(state_key, str):
            continue
        if event_type == MEMBER:
            if not is_valid_user_id(state_key):
                continue
            held_member = member_events.get(state_key)
            if held_member is None or _depth(held_member) <= _depth(ev):
                member_events[state_key] = ev
            floor = max(floor, _depth(ev))
            continue
        if event_type not in TRACKED_TYPES:
            continue
        if event_type in SINGLETON_TYPES and state_key != "":
            continue
        content = ev.get("content")
        note_rejected_rule(event_type, content if isinstance(content, Mapping) else {})
        held = tracked.get((event_type, state_key))
        if held is None or _depth(held) <= _depth(ev):
            tracked[(event_type, state_key)] = ev
        floor = max(floor, _depth(ev))
    rows = []
    rules = 0
    for (event_type, state_key), ev in tracked.items():
        if event_type in RULE_TYPES:
            if rules >= caps.policy_rules:
                CAP_HITS.labels("policy_rule").inc()
                continue
            rules += 1
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
    member_rows: list[tuple[str, str, str, str, str, str, int]] = []
    names: list[tuple[str, str, str]] = []
    own_membership: str | None = None
    for user_id, ev in member_events.items():
        content = ev.get("content")
        if not isinstance(content, Mapping):
            content = {}
        m = content.get("membership")
        if our_user_id and user_id == our_user_id:
            own_membership = m if isinstance(m, str) else None
        if not isinstance(m, str) or m == "leave":
            continue
        if len(member_rows) >= caps.members:
            CAP_HITS.labels("member").inc()
            continue
        try:
            ev_id = str(compute_event_id(version, ev))
        except ValueError:
            ev_id = ""
        sender = ev.get("sender")
        member_rows.append(
            (
                room_id,
                user_id,
                user_id.partition(":")[2],
                m,
                ev_id,
                sender.partition(":")[2] if isinstance(sender, str) else "",
                _depth(ev),
            )
        )
        if m == "join":
            if len(names) >= caps.displaynames:
                CAP_HITS.labels("displayname").inc()
                continue
            names.append((room_id, user_id, _displayname(content, caps.displayname_length)))
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
        await conn.execute("DELETE FROM room_members WHERE room_id = $1", room_id)
        await conn.executemany(
            """
            INSERT INTO room_members
                (room_id, user_id, server_name, membership, event_id, sender, depth)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            """,
            member_rows,
        )
        await conn.execute("DELETE FROM displaynames WHERE room_id = $1", room_id)
        await conn.executemany(
            "INSERT INTO displaynames (room_id, user_id, displayname) VALUES ($1, $2, $3)",
            names,
        )
        await conn.execute(
            """
            UPDATE room_state SET last_event_id = COALESCE($2, last_event_id),
                trusted_event_id = COALESCE($2, trusted_event_id),
                trusted_depth = $5,
                member_count = $6, displayname_count = $7, rule_count = $8,
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
            floor,
            len(member_rows),
            len(names),
            rules,
        )
        await _touch(conn, room_id, now)
    return len(rows) + len(member_rows)


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


async def get_name_and_topic(pool: asyncpg.Pool, room_id: str) -> tuple[str, str]:
    """The room's learned ``m.room.name`` ``name`` and ``m.room.topic`` ``topic`` (each
    ``""`` when unknown, unset or not a string)."""
    rows = await pool.fetch(
        """
        SELECT event_type, content FROM room_state_events
        WHERE room_id = $1 AND state_key = '' AND event_type = ANY($2::text[])
        """,
        room_id,
        [NAME, TOPIC],
    )
    found = {NAME: "", TOPIC: ""}
    for row in rows:
        content = orjson.loads(row["content"])
        field = "name" if row["event_type"] == NAME else "topic"
        value = content.get(field) if isinstance(content, dict) else None
        if isinstance(value, str):
            found[row["event_type"]] = value
    return found[NAME], found[TOPIC]


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
    # The anchor of the last verified snapshot (trusted servers know it); None if none.
    trusted_event_id: str | None = None


async def rooms_to_refresh(pool: asyncpg.Pool) -> list[RefreshTarget]:
    """Protected rooms with a known recent event, where Warden was not removed; the
    least recently refreshed first."""
    rows = await pool.fetch(
        """
        SELECT r.room_id, r.room_version, s.last_event_id, s.trusted_event_id
        FROM rooms r JOIN room_state s ON s.room_id = r.room_id
        WHERE s.last_event_id IS NOT NULL
          AND (s.warden_membership IS NULL OR s.warden_membership NOT IN ('leave', 'ban'))
        ORDER BY s.last_refresh_ts, r.room_id
        """
    )
    return [
        RefreshTarget(r["room_id"], r["room_version"], r["last_event_id"], r["trusted_event_id"])
        for r in rows
    ]


# --- the auth rules' view of the room (warden.matrix.state_auth) -------------------


async def server_in_room(pool: asyncpg.Pool, room_id: str, server_name: str) -> bool:
    """Whether learned membership has at least one joined member on ``server_name``."""
    found = await pool.fetchval(
        """
        SELECT 1 FROM room_members
        WHERE room_id = $1 AND server_name = $2 AND membership = 'join' LIMIT 1
        """,
        room_id,
        server_name,
    )
    return found is not None


async def joined_servers(pool: asyncpg.Pool, room_id: str, limit: int) -> list[str]:
    """Up to ``limit`` servers with joined members in the room, the most members first."""
    rows = await pool.fetch(
        """
        SELECT server_name FROM room_members WHERE room_id = $1 AND membership = 'join'
        GROUP BY server_name ORDER BY count(*) DESC, server_name LIMIT $2
        """,
        room_id,
        limit,
    )
    return [r["server_name"] for r in rows]


async def load_auth_state(
    pool: asyncpg.Pool, room_id: str, room_version: RoomVersion, event: Mapping[str, Any]
) -> AuthState:
    """What ``warden.matrix.state_auth.check_event`` needs to judge ``event``: the
    learned create event, power levels and join rule, and the memberships of the
    sender, the target of a member event and a restricted join's authorising user."""
    sender = event.get("sender")
    content = event.get("content")
    content = content if isinstance(content, Mapping) else {}
    target = event.get("state_key") if event.get("type") == MEMBER else None
    authoriser = content.get("join_authorised_via_users_server") if target is not None else None
    users = [u for u in (sender, target, authoriser) if isinstance(u, str)]
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """
            SELECT event_type, content, sender FROM room_state_events
            WHERE room_id = $1 AND state_key = '' AND event_type = ANY($2::text[])
            """,
            room_id,
            [CREATE, POWER_LEVELS, JOIN_RULES],
        )
        members = await conn.fetch(
            """
            SELECT user_id, membership FROM room_members
            WHERE room_id = $1 AND user_id = ANY($2::text[])
            """,
            room_id,
            users,
        )
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for row in rows:
        value = orjson.loads(row["content"])
        found[row["event_type"]] = (value if isinstance(value, dict) else {}, row["sender"])
    membership = {r["user_id"]: r["membership"] for r in members}
    create = found.get(CREATE)
    join_rules = found.get(JOIN_RULES)
    rule = join_rules[0].get("join_rule") if join_rules else None
    return AuthState(
        room_version=room_version,
        create=create[0] if create else None,
        create_sender=create[1] if create else "",
        power_levels=found[POWER_LEVELS][0] if POWER_LEVELS in found else None,
        join_rule=rule if isinstance(rule, str) else None,
        sender_membership=membership.get(sender) if isinstance(sender, str) else None,
        target_membership=membership.get(target) if isinstance(target, str) else None,
        authoriser_membership=(membership.get(authoriser) if isinstance(authoriser, str) else None),
    )

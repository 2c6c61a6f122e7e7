"""Policy list filter: senders banned by the community's moderation policy lists.

policyserv's ``MjolnirFilter``, with the gaps of its version closed (reference §8.2 item
5): the lists are per community (``policy_list_room_ids``), not one room per instance;
every event type is checked, not only ``m.room.message`` (a banned user's reactions,
stickers and state events are refused too); server rules count (the sender's server is
matched against ``m.policy.rule.server`` globs); room rules are never matched against
senders.

Rules come from the learned state of the list rooms (``warden.storage.room_state``):
``m.policy.rule.user`` / ``.server`` (and their legacy types) whose recommendation is a
ban (``m.ban``, ``org.matrix.mjolnir.ban``, or a takedown). Entities are globs, ``*``
and ``?``, matched in bounded time (``warden.matrix.globs``; review H3: a regex
translation let one rule wedge every worker). A list room must be one Warden has joined
and protects (in any community): Warden learns state only of such rooms. Rules are
cached per worker for ``RULE_CACHE_SECONDS``.

Decisions: the refusal's harm is ``org.matrix.msc4456.other``, as policyserv's (a list
ban may be for any reason, and the list's reason is free text); a user's own ``leave``
is let through (leaving is what a ban asks of them); an invite is refused when the
invitee (its ``state_key``) is banned, whoever sends it. policyserv's key
``mjolnir_filter_enabled`` is also declared, so its stored configs keep working: the
filter runs only when it and ``policy_list_filter_enabled`` are both true.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.matrix.globs import GlobIndex
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import OTHER
from warden.storage.room_state import PolicyRule, get_policy_rules

ROOM_IDS, ENABLED, MJOLNIR_ENABLED = declare(
    ConfigKey(
        "policy_list_room_ids",
        "list[str]",
        [],
        "Moderation policy list rooms whose m.policy.rule.user and m.policy.rule.server "
        "bans apply to this community's rooms. Each must be a room Warden has joined and "
        "protects. Empty disables the policy list filter.",
    ),
    ConfigKey(
        "policy_list_filter_enabled",
        "bool",
        True,
        "Refuse events whose sender, or the sender's server, is banned by a policy list "
        "room in policy_list_room_ids.",
    ),
    ConfigKey(
        "mjolnir_filter_enabled",
        "bool",
        True,
        "policyserv's name for policy_list_filter_enabled, kept so its stored configs work: "
        "the policy list filter runs only when both are true.",
    ),
)

RULE_CACHE_SECONDS = 10.0
# Senders whose answer an index remembers (it is rebuilt with every reload of the rules).
SENDER_MEMO_SIZE = 4096


class BanIndex:
    """The ban rules of some list rooms, indexed to match senders in bounded time.

    Rules without wildcards are one dictionary lookup; glob rules use the bounded
    matcher of ``warden.matrix.globs`` (entities over its caps never become rules).
    Answers for recent senders are remembered, as senders repeat.
    """

    def __init__(self, rules: Sequence[PolicyRule]) -> None:
        self.rules = list(rules)
        self._users = GlobIndex((r.entity, r) for r in rules if r.kind == "user")
        # Server names are case-insensitive.
        self._servers = GlobIndex((r.entity.lower(), r) for r in rules if r.kind == "server")
        self._memo: dict[str, PolicyRule | None] = {}

    def banning_rule(self, sender: str) -> PolicyRule | None:
        """A rule that bans ``sender`` or its server, or None."""
        if sender in self._memo:
            return self._memo[sender]
        rule = self._users.first_match(sender)
        if rule is None:
            _, sep, server = sender.partition(":")
            if sep:
                rule = self._servers.first_match(server.lower())
        if len(self._memo) >= SENDER_MEMO_SIZE:
            self._memo.clear()
        self._memo[sender] = rule
        return rule


_cache: dict[tuple[str, ...], tuple[float, BanIndex]] = {}


async def index_for(pool: asyncpg.Pool, room_ids: Sequence[str]) -> BanIndex:
    """The ban rules of these list rooms, indexed and cached briefly in process."""
    key = tuple(sorted(set(room_ids)))
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    index = BanIndex(await get_policy_rules(pool, key))
    if len(_cache) > 1_000:  # bound memory; reloading is one query
        _cache.clear()
    _cache[key] = (now + RULE_CACHE_SECONDS, index)
    return index


async def rules_for(pool: asyncpg.Pool, room_ids: Sequence[str]) -> list[PolicyRule]:
    """The ban rules of these list rooms, cached briefly in process."""
    return (await index_for(pool, room_ids)).rules


def clear_rule_cache() -> None:
    """Forget cached rules (tests; a worker otherwise waits for the TTL)."""
    _cache.clear()


def banning_rule(rules: Sequence[PolicyRule], sender: str) -> PolicyRule | None:
    """A rule that bans ``sender`` or its server, or None (builds an index: for one-offs)."""
    return BanIndex(rules).banning_rule(sender)


class PolicyListFilter(Filter):
    """Prohibits events from users or servers banned by the community's policy lists."""

    name = "policy_list"
    # A prefilter: group 0 always runs and its refusal beats an allowing prefilter, so
    # event types that event_type_prefilter allows (state events) are covered too.
    group = Group.PREFILTER
    harm_ids = (OTHER,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while both switches are true and some list room is named."""
        return (
            config.get_bool(ENABLED.name)
            and config.get_bool(MJOLNIR_ENABLED.name)
            and bool(config.get_list(ROOM_IDS.name))
        )

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when a user rule matches the sender or a server rule its server,
        or, for an invite, the same of the invitee."""
        sender = ctx.sender
        if not sender:
            return FilterResult.neutral()
        if (
            ctx.event_type == "m.room.member"
            and ctx.event.get("state_key") == sender
            and ctx.content.get("membership") == "leave"
        ):
            return FilterResult.neutral()
        index = await index_for(ctx.deps.pool, ctx.config.get_list(ROOM_IDS.name))
        if index.banning_rule(sender) is not None:
            return FilterResult.prohibited(OTHER)
        # An invite brings its invitee towards the room: a banned invitee is refused too
        # (a join is checked by its sender, the joining user, above).
        if ctx.event_type == "m.room.member" and ctx.content.get("membership") == "invite":
            invitee = ctx.event.get("state_key")
            if isinstance(invitee, str) and invitee and index.banning_rule(invitee) is not None:
                return FilterResult.prohibited(OTHER)
        return FilterResult.neutral()

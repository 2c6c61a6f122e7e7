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
and ``?``. A list room must be one Warden has joined and protects (in any community):
Warden learns state only of such rooms. Rules are cached per worker for
``RULE_CACHE_SECONDS``.

Decisions: the refusal's harm is ``org.matrix.msc4456.other``, as policyserv's (a list
ban may be for any reason, and the list's reason is free text); a user's own ``leave``
is let through (leaving is what a ban asks of them). policyserv's key
``mjolnir_filter_enabled`` is also declared, so its stored configs keep working: the
filter runs only when it and ``policy_list_filter_enabled`` are both true.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg

from warden.filters.base import Filter, FilterContext, FilterResult, Group
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

_cache: dict[tuple[str, ...], tuple[float, list[PolicyRule]]] = {}


async def rules_for(pool: asyncpg.Pool, room_ids: Sequence[str]) -> list[PolicyRule]:
    """The ban rules of these list rooms, cached briefly in process."""
    key = tuple(sorted(set(room_ids)))
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    rules = await get_policy_rules(pool, key)
    if len(_cache) > 1_000:  # bound memory; reloading is one query
        _cache.clear()
    _cache[key] = (now + RULE_CACHE_SECONDS, rules)
    return rules


def clear_rule_cache() -> None:
    """Forget cached rules (tests; a worker otherwise waits for the TTL)."""
    _cache.clear()


def banning_rule(rules: Sequence[PolicyRule], sender: str) -> PolicyRule | None:
    """The first rule that bans ``sender`` or its server, or None."""
    _, sep, server = sender.partition(":")
    for rule in rules:
        if rule.kind == "user" and rule.matches(sender):
            return rule
        if rule.kind == "server" and sep and rule.matches(server):
            return rule
    return None


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
        """Prohibited when a user rule matches the sender or a server rule its server."""
        sender = ctx.sender
        if not sender:
            return FilterResult.neutral()
        if (
            ctx.event_type == "m.room.member"
            and ctx.event.get("state_key") == sender
            and ctx.content.get("membership") == "leave"
        ):
            return FilterResult.neutral()
        rules = await rules_for(ctx.deps.pool, ctx.config.get_list(ROOM_IDS.name))
        if banning_rule(rules, sender) is not None:
            return FilterResult.prohibited(OTHER)
        return FilterResult.neutral()

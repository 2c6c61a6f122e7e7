"""Mentions filter: an ``m.room.message`` that mentions too many room members.

As policyserv's ``MentionsFilter``: count the ``m.mentions.user_ids`` that are learned
members of the room; then each learned member whose user ID appears in ``body`` or
``formatted_body``; then each *distinct* learned display name (at least
``mention_filter_min_plaintext_length`` bytes) that appears there. Distinct names, so a
crowd of members all named "the" counts once. Counting stops at the limit.
"""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

MAX_MENTIONS, MIN_PLAINTEXT_LENGTH = declare(
    ConfigKey(
        "mention_filter_max_mentions",
        "int",
        20,
        "A message mentioning at least this many members is flooding. Zero or negative disables.",
    ),
    ConfigKey(
        "mention_filter_min_plaintext_length",
        "int",
        5,
        "Display names shorter than this many bytes are not looked for in the text.",
    ),
)


class MentionsFilter(Filter):
    """Prohibits messages that mention at least ``mention_filter_max_mentions`` members."""

    name = "mentions"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)
    # A query only when the room's display names are not in memory (every few seconds
    # per room): the other messages need no timer of their own.
    waits_on_io = False
    waits_on_io_sometimes = True

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum is positive."""
        return config.get_int(MAX_MENTIONS.name) > 0

    def waits_for(self, ctx: FilterContext) -> bool:
        """Messages of a room whose display names must be read from PostgreSQL."""
        return ctx.event_type == "m.room.message" and not ctx.deps.displaynames.fresh(ctx.room_id)

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited once the mention count reaches the maximum (≥)."""
        limit = ctx.config.get_int(MAX_MENTIONS.name)
        min_len = ctx.config.get_int(MIN_PLAINTEXT_LENGTH.name)
        if await count_mentions(ctx, limit, min_len) >= limit:
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()


async def count_mentions(ctx: FilterContext, limit: int, min_len: int) -> int:
    """Mentions of learned members in an ``m.room.message``, counted up to ``limit``
    (0 for other event types); names shorter than ``min_len`` bytes are not looked for.

    Shared with the mention frequency filter, as in policyserv.
    """
    if ctx.event_type != "m.room.message":
        return 0
    members = await ctx.deps.displaynames.get(ctx.room_id)

    mentions = ctx.content.get("m.mentions")
    raw_ids = mentions.get("user_ids") if isinstance(mentions, dict) else None
    mentioned = {u for u in raw_ids if isinstance(u, str)} if isinstance(raw_ids, list) else set()
    count = len(mentioned & members.keys())
    if count >= limit:
        return limit

    body = ctx.string_field("body")
    formatted = ctx.string_field("formatted_body")
    names = {n for n in members.values() if n and len(n.encode("utf-8")) >= min_len}
    for needle in (*(u for u in members if u), *names):
        if needle in body or needle in formatted:
            count += 1
            if count >= limit:
                return count
    return count

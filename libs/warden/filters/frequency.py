"""Frequency filter: too many events of the listed types from one sender per minute.

The window is a Redis sorted set per (community, sender), shared by every worker:
members are event IDs scored by the time (ms) Warden first counted them. ``ZADD NX``
keeps the first score, so the same event evaluated twice counts once. Members older
than 60 s are pruned on each check; the key expires when the sender goes quiet.
"""

from __future__ import annotations

from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

EVENT_TYPES, RATE_LIMIT = declare(
    ConfigKey(
        "frequency_filter_event_types",
        "list[str]",
        ["m.room.message", "m.sticker", "m.reaction"],
        "Event types counted by the frequency filter.",
    ),
    ConfigKey(
        "frequency_filter_rate_limit",
        "float",
        0.0,
        "Events per second (averaged over 60 s) a sender may send in the community; "
        "above it events are flooding. Zero disables.",
    ),
)

WINDOW_MS = 60_000


class FrequencyFilter(Filter):
    """Prohibits senders above ``frequency_filter_rate_limit`` events per second."""

    name = "frequency"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the rate limit is positive and some event type is listed."""
        return config.get_float(RATE_LIMIT.name) > 0 and bool(config.get_list(EVENT_TYPES.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Count this event, then prohibit when (count in the last 60 s)/60 > rate."""
        if ctx.event_type not in ctx.config.get_list(EVENT_TYPES.name) or not ctx.sender:
            return FilterResult.neutral()
        key = redis_keys.frequency(self.name, ctx.community_id, ctx.sender)
        now = ctx.now_ms
        async with ctx.deps.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {ctx.event_id: now}, nx=True)
            pipe.zremrangebyscore(key, "-inf", now - WINDOW_MS)
            pipe.zcard(key)
            pipe.pexpire(key, WINDOW_MS * 2)
            results = await pipe.execute()
        count = int(results[2])
        if count / 60 > ctx.config.get_float(RATE_LIMIT.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

"""Frequency filter: too many events of the listed types from one sender per minute.

The window is a Redis sorted set per (community, sender), shared by every worker:
members are event IDs scored by the time (ms) Warden first counted them. ``ZADD NX``
keeps the first score, so the same event evaluated twice counts once. Members older
than 60 s are pruned on each check; the key expires when the sender goes quiet.

The four steps (add the event, prune, count, extend the expiry) are one Lua script, so
they stay atomic as the MULTI/EXEC they replace, and one command: it goes through the
auto-pipeline, so the events evaluated together share one round trip.

An event whose sender is not verified (``FilterContext.sender_verified``) is not
counted: a forged event must not fill someone else's window.
"""

from __future__ import annotations

from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING
from warden.storage.redis_autopipeline import Script

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

# KEYS: the window; ARGV: the event ID, now (ms), the newest score to prune (now minus
# the window), the key's expiry (ms). Returns how many events the window holds now.
_COUNT = Script("""
redis.call('zadd', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[3])
local count = redis.call('zcard', KEYS[1])
redis.call('pexpire', KEYS[1], ARGV[4])
return count
""")


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
        if not ctx.sender_verified:
            return FilterResult.neutral()
        key = redis_keys.frequency(self.name, ctx.community_id, ctx.sender)
        now = ctx.now_ms
        count = int(
            await ctx.deps.auto_pipeline.run_script(
                _COUNT, keys=[key], args=[ctx.event_id, now, now - WINDOW_MS, WINDOW_MS * 2]
            )
        )
        if count / 60 > ctx.config.get_float(RATE_LIMIT.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

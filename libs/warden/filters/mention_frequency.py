"""Mention frequency filter: too many mentions from one sender per minute.

As policyserv's ``MentionsFrequencyFilter``: each event's mentions are counted as the
mentions filter counts them (``count_mentions``, with
``mention_frequency_filter_min_plaintext_length``), capped at ``ceil(rate * 60 + 1)``;
the event is flooding when (mentions in the last 60 s, this event's included) / 60 >
``mention_frequency_filter_rate_limit``. Every event type is checked against the
window (an event without mentions adds nothing but is still refused while the sender is
over the rate), as in policyserv.

Unlike policyserv's per-process counter, the window is in Redis and shared by every
worker: a sorted set of event IDs scored by the time they were first counted
(``redis_keys.frequency``) and a hash of what each added with a running total
(``redis_keys.frequency_counts``). An event ID is added once (``ZADD NX``), so the same
event evaluated twice counts once, and its first count stands. The keys hold nothing of
the configuration, so a configuration change does not reset the window. One Lua script
adds, prunes and sums atomically in one command through the auto-pipeline.

An event whose sender is not verified is neither counted nor refused
(``FilterContext.sender_verified``), like the frequency filter.
"""

from __future__ import annotations

import math

from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.filters.mentions import count_mentions
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING
from warden.storage.redis_autopipeline import Script

RATE_LIMIT, MIN_PLAINTEXT_LENGTH = declare(
    ConfigKey(
        "mention_frequency_filter_rate_limit",
        "float",
        0.0,
        "Mentions per second (averaged over 60 s) a sender may make in the community; "
        "above it events are flooding. Zero disables.",
    ),
    ConfigKey(
        "mention_frequency_filter_min_plaintext_length",
        "int",
        5,
        "Display names shorter than this many bytes are not counted as mentions by the "
        "mention frequency filter.",
    ),
)

WINDOW_MS = 60_000
TOTAL_FIELD = "#total"

# KEYS: the window (zset), the counts (hash). ARGV: the event ID, its mention count,
# now (ms), the newest score to prune, the keys' expiry (ms). Returns the window's total.
_COUNT = Script("""
local n = tonumber(ARGV[2])
if n > 0 and redis.call('zadd', KEYS[1], 'NX', ARGV[3], ARGV[1]) == 1 then
  redis.call('hset', KEYS[2], ARGV[1], n)
  redis.call('hincrby', KEYS[2], '#total', n)
end
local old = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[4])
for _, id in ipairs(old) do
  local c = tonumber(redis.call('hget', KEYS[2], id) or '0')
  redis.call('hincrby', KEYS[2], '#total', -c)
  redis.call('hdel', KEYS[2], id)
end
if #old > 0 then
  redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[4])
end
local total = tonumber(redis.call('hget', KEYS[2], '#total') or '0')
if redis.call('zcard', KEYS[1]) == 0 then
  redis.call('del', KEYS[1], KEYS[2])
  return 0
end
redis.call('pexpire', KEYS[1], ARGV[5])
redis.call('pexpire', KEYS[2], ARGV[5])
return total
""")


def per_event_cap(rate_limit: float) -> int:
    """policyserv's cap on one event's count: enough to exceed the rate on its own."""
    return math.ceil(rate_limit * 60 + 1)


class MentionFrequencyFilter(Filter):
    """Prohibits senders above ``mention_frequency_filter_rate_limit`` mentions/second."""

    name = "mention_frequency"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the rate limit is positive."""
        return config.get_float(RATE_LIMIT.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Count this event's mentions once, then prohibit when total/60 > rate."""
        if not ctx.sender or not ctx.sender_verified:
            return FilterResult.neutral()
        rate = ctx.config.get_float(RATE_LIMIT.name)
        mentions = await count_mentions(
            ctx, per_event_cap(rate), ctx.config.get_int(MIN_PLAINTEXT_LENGTH.name)
        )
        now = ctx.now_ms
        total = int(
            await ctx.deps.auto_pipeline.run_script(
                _COUNT,
                keys=[
                    redis_keys.frequency(self.name, ctx.community_id, ctx.sender),
                    redis_keys.frequency_counts(self.name, ctx.community_id, ctx.sender),
                ],
                args=[ctx.event_id, mentions, now, now - WINDOW_MS, WINDOW_MS * 2],
            )
        )
        if total / 60 > rate:
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

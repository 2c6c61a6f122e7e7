"""Hellban prefilter: refuse everything from a sender serving a hellban.

The ban is set by ``hellban_postfilter`` (same switch, ``hellban_postfilter_minutes``)
in Redis, shared by every worker. Runs after the prefilters and only while the class is
neutral, so allow-listed senders and event types (a user leaving a room, a redaction)
are never hellbanned.

The lookup goes through the auto-pipeline: the events evaluated together ask Redis in
one round trip.
"""

from __future__ import annotations

from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.filters.hellban_postfilter import HELLBAN_MINUTES
from warden.policy.config import EffectiveConfig
from warden.policy.harms import SPAM_FLOODING


class HellbanPrefilter(Filter):
    """Prohibits events from hellbanned senders."""

    name = "hellban_prefilter"
    group = Group.HELLBAN_PREFILTER
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while ``hellban_postfilter_minutes`` is positive."""
        return config.get_int(HELLBAN_MINUTES.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited (spam.flooding) while the sender's ban exists."""
        if ctx.sender and await ctx.deps.auto_pipeline.execute_command(
            "EXISTS", redis_keys.hellban(ctx.community_id, ctx.sender)
        ):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

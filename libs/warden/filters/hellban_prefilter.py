"""Hellban prefilter: refuse everything from a sender serving a hellban.

The ban is set by ``hellban_postfilter`` (same switch, ``hellban_postfilter_minutes``)
in Redis, shared by every worker. Runs after the prefilters and only while the class is
neutral, so allow-listed senders and event types (a user leaving a room, a redaction)
are never hellbanned.

The filter worker reads the ban in the script that claims a batch's events
(``FilterContext.hellbanned``), so this filter usually needs no Redis round trip of its
own; otherwise (text checks, spam-checker callbacks, a look-up without Redis) it asks
through the auto-pipeline, where the events evaluated together share one round trip.
While Redis is down, only the bans this worker set meanwhile count
(``warden.filters.hellban_store``).
"""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.filters.hellban_postfilter import HELLBAN_MINUTES
from warden.policy.config import EffectiveConfig
from warden.policy.harms import SPAM_FLOODING


class HellbanPrefilter(Filter):
    """Prohibits events from hellbanned senders."""

    name = "hellban_prefilter"
    group = Group.HELLBAN_PREFILTER
    harm_ids = (SPAM_FLOODING,)
    waits_on_io = False
    waits_on_io_sometimes = True

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while ``hellban_postfilter_minutes`` is positive."""
        return config.get_int(HELLBAN_MINUTES.name) > 0

    def waits_for(self, ctx: FilterContext) -> bool:
        """Only when the caller did not read the ban already."""
        return ctx.hellbanned is None

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited (spam.flooding) while the sender's ban exists."""
        if not ctx.sender:
            return FilterResult.neutral()
        hellbans = ctx.deps.hellbans
        if ctx.hellbanned is not None:
            # Read by the worker's claiming script; a ban this worker set while Redis
            # was down lives only here (``hellban_store``).
            banned = ctx.hellbanned or hellbans.banned_here(ctx.community_id, ctx.sender)
        else:
            banned = await hellbans.banned(ctx.community_id, ctx.sender)
        return FilterResult.prohibited(SPAM_FLOODING) if banned else FilterResult.neutral()

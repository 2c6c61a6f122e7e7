"""Hellban postfilter: a prohibited event puts its sender in a community-wide timeout.

Runs only when the verdict so far is prohibited. It sets
``redis_keys.hellban(community, sender)`` with NX and a TTL of
``hellban_postfilter_minutes``, so every worker sees the ban at once, a restarted worker
does not forget it, and a repeat offence while banned does not extend it (policyserv's
rule: the ban cannot become permanent through retries). While Redis is down the ban is
kept in this worker only (``warden.filters.hellban_store``). The write is started, not
awaited (``FilterContext.start_effect``): the filter worker commits the refusal with the
rest of its batch while the write is out, and answers once both are done, so the ban is
in place before anyone hears of the refusal.

Unlike policyserv this filter records no harm of its own: the event is already
prohibited for the reasons the other filters gave, and adding ``spam.flooding`` to a
keyword hit would misreport why. A verdict that is prohibited only because filters
*failed* (fail-secure) does not hellban anyone: an outage is not the sender's doing.
Nor does an event whose sender is not verified (``FilterContext.sender_verified``):
whoever forged it must not get the named user banned. Nor does a refusal by a filter
in dry run, and in dry run itself this filter sets no ban.
"""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.verdict import ContentClass

(HELLBAN_MINUTES,) = declare(
    ConfigKey(
        "hellban_postfilter_minutes",
        "int",
        60,
        "After a refused event, refuse everything else the sender sends in the community "
        "for this many minutes (not extended by further events). Zero or negative disables.",
    ),
)


class HellbanPostfilter(Filter):
    """Starts a hellban for the sender of a prohibited event."""

    name = "hellban_postfilter"
    group = Group.POSTFILTER
    harm_ids = ()
    # The ban is started, not awaited (``start_effect``): the verdict is decided already.
    waits_on_io = False

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the duration is positive."""
        return config.get_int(HELLBAN_MINUTES.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Start setting the ban (NX: never extended) when a filter really prohibited the
        event; the pipeline's caller waits for it before answering."""
        judged = any(
            o.content_class is ContentClass.PROHIBITED and o.error is None and not o.dry_run
            for o in ctx.earlier
        )
        if judged and ctx.sender and ctx.sender_verified and not ctx.dry_run:
            minutes = ctx.config.get_int(HELLBAN_MINUTES.name)
            # In Redis; while it is down, in this worker (``hellban_store``). Not awaited
            # here: in the filter worker the write's round trip overlaps the verdict's
            # commit instead of coming before it.
            ctx.start_effect(
                self.name, ctx.deps.hellbans.ban(ctx.community_id, ctx.sender, minutes * 60)
            )
        return FilterResult.neutral()

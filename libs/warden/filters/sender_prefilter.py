"""Sender prefilter: listed user IDs skip the content filters (policyserv's ``SenderFilter``)."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare

(ALLOWED_SENDERS,) = declare(
    ConfigKey(
        "sender_prefilter_allowed_senders",
        "list[str]",
        [],
        "User IDs whose events are always allowed (exact match). Empty disables.",
    ),
)


class SenderPrefilter(Filter):
    """Allows events from the configured senders."""

    name = "sender_prefilter"
    waits_on_io = False
    group = Group.PREFILTER
    harm_ids = ()

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the list is non-empty."""
        return bool(config.get_list(ALLOWED_SENDERS.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Allowed when the sender is listed."""
        # An unverified sender (``FilterContext.sender_verified``) may be anyone.
        if (
            ctx.sender
            and ctx.sender_verified
            and ctx.sender in ctx.config.get_list(ALLOWED_SENDERS.name)
        ):
            return FilterResult.allowed()
        return FilterResult.neutral()

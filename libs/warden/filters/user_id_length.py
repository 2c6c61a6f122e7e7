"""User ID length filter: a sender ID longer than ``user_id_length_filter_max_length``.

As policyserv's ``UserIdLengthFilter``: the length is in bytes (Go's ``len``), the
comparison strict (>), any event type; zero or negative disables.
"""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

(MAX_LENGTH,) = declare(
    ConfigKey(
        "user_id_length_filter_max_length",
        "int",
        0,
        "Events whose sender's user ID is longer than this many bytes are flooding. "
        "Zero or negative disables.",
    ),
)


class UserIdLengthFilter(Filter):
    """Prohibits events from senders whose user ID exceeds the maximum length."""

    name = "user_id_length"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)
    waits_on_io = False

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum is positive."""
        return config.get_int(MAX_LENGTH.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when len(sender) in bytes > the maximum."""
        if len(ctx.sender.encode("utf-8")) > ctx.config.get_int(MAX_LENGTH.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

"""Trim-length filter: a message body padded with too much leading/trailing whitespace."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

(MAX_DIFFERENCE,) = declare(
    ConfigKey(
        "trim_length_filter_max_difference",
        "int",
        25,
        "An m.room.message whose body loses at least this many bytes when leading and "
        "trailing whitespace is trimmed is flooding. Zero or negative disables.",
    ),
)


class TrimLengthFilter(Filter):
    """Prohibits bodies padded with whitespace."""

    name = "trim_length"
    checks_text = True
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum difference is positive."""
        return config.get_int(MAX_DIFFERENCE.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when the trimmed bytes reach the maximum (≥, as policyserv)."""
        if ctx.event_type != "m.room.message":
            return FilterResult.neutral()
        body = ctx.string_field("body")
        trimmed = len(body.encode("utf-8")) - len(body.strip().encode("utf-8"))
        if trimmed >= ctx.config.get_int(MAX_DIFFERENCE.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

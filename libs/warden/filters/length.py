"""Length filter: an ``m.room.message`` whose JSON is too long."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

(MAX_LENGTH,) = declare(
    ConfigKey(
        "length_filter_max_length",
        "int",
        10000,
        "An m.room.message whose JSON is longer than this many bytes is flooding. "
        "Zero or negative disables.",
    ),
)


class LengthFilter(Filter):
    """Prohibits ``m.room.message`` events longer than ``length_filter_max_length`` bytes."""

    name = "length"
    checks_text = True
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum is positive."""
        return config.get_int(MAX_LENGTH.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when the event's canonical JSON is longer than the maximum (>)."""
        if ctx.event_type != "m.room.message":
            return FilterResult.neutral()
        if len(ctx.event_json_bytes) > ctx.config.get_int(MAX_LENGTH.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

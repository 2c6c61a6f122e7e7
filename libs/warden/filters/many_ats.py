"""Many-ats filter: too many ``@`` in an event's content, whatever its type."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

(MAX_ATS,) = declare(
    ConfigKey(
        "many_ats_filter_max_ats",
        "int",
        20,
        "An event whose content JSON holds at least this many '@' is flooding. "
        "Zero or negative disables.",
    ),
)


class ManyAtsFilter(Filter):
    """Prohibits content with at least ``many_ats_filter_max_ats`` ``@`` characters."""

    name = "many_ats"
    checks_text = True
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum is positive."""
        return config.get_int(MAX_ATS.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when the count reaches the maximum (≥, as policyserv)."""
        if ctx.content_json.count("@") >= ctx.config.get_int(MAX_ATS.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

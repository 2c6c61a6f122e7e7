"""Keyword filter: a case-sensitive substring of the content JSON (or the whole event)."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM

KEYWORDS, USE_FULL_EVENT = declare(
    ConfigKey(
        "keyword_filter_keywords",
        "list[str]",
        ["spammy", "spam"],
        "Case-sensitive substrings that make an event spam. Empty disables.",
    ),
    ConfigKey(
        "keyword_filter_use_full_event",
        "bool",
        False,
        "Search the whole event's JSON instead of only its content.",
    ),
)


class KeywordFilter(Filter):
    """Prohibits events containing a listed keyword."""

    name = "keyword"
    checks_text = True
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the keyword list holds a non-empty keyword."""
        return any(config.get_list(KEYWORDS.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited (spam) on the first keyword found."""
        text = ctx.event_json if ctx.config.get_bool(USE_FULL_EVENT.name) else ctx.content_json
        for keyword in ctx.config.get_list(KEYWORDS.name):
            # An empty keyword would match everything; treat it as absent.
            if keyword and keyword in text:
                return FilterResult.prohibited(SPAM)
        return FilterResult.neutral()

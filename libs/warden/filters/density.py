"""Density filter: a long message body with (almost) no whitespace."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

MAX_DENSITY, MIN_TRIGGER_LENGTH = declare(
    ConfigKey(
        "density_filter_max_density",
        "float",
        0.95,
        "An m.room.message body whose non-whitespace share of bytes is at least this is "
        "flooding. Zero or negative disables.",
    ),
    ConfigKey(
        "density_filter_min_trigger_length",
        "int",
        150,
        "Bodies shorter than this many bytes are not checked (does not enable/disable).",
    ),
)

# The whitespace policyserv removes (Go RE2 ``\s``): ASCII tab, newline, form feed,
# carriage return and space. Deleted with ``bytes.translate``: one pass in C, without
# the regex engine (which was most of this filter's cost).
_WHITESPACE = b"\t\n\f\r "


class DensityFilter(Filter):
    """Prohibits long, dense bodies."""

    name = "density"
    checks_text = True
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum density is positive."""
        return config.get_float(MAX_DENSITY.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when long enough (≥ min) and density ≥ max."""
        if ctx.event_type != "m.room.message":
            return FilterResult.neutral()
        body = ctx.string_field("body").encode("utf-8")
        if not body or len(body) < ctx.config.get_int(MIN_TRIGGER_LENGTH.name):
            return FilterResult.neutral()
        density = len(body.translate(None, _WHITESPACE)) / len(body)
        if density >= ctx.config.get_float(MAX_DENSITY.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

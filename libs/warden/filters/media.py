"""Media filter: refuses media event types and message types (on by default, as policyserv)."""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import MEDIA, SPAM

(MEDIA_TYPES,) = declare(
    ConfigKey(
        "media_filter_media_types",
        "list[str]",
        ["m.sticker", "m.image", "m.video", "m.file", "m.audio"],
        "Event types, and m.room.message msgtypes, that are refused as media. Empty disables.",
    ),
)


class MediaFilter(Filter):
    """Prohibits the listed event types and ``m.room.message`` msgtypes."""

    name = "media"
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM, MEDIA)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the list is non-empty."""
        return bool(config.get_list(MEDIA_TYPES.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited (spam + media) on a listed type or msgtype."""
        types = ctx.config.get_list(MEDIA_TYPES.name)
        if ctx.event_type in types:
            return FilterResult.prohibited(SPAM, MEDIA)
        if ctx.event_type == "m.room.message":
            msgtype = ctx.string_field("msgtype")
            if msgtype and msgtype in types:
                return FilterResult.prohibited(SPAM, MEDIA)
        return FilterResult.neutral()

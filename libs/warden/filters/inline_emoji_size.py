"""Inline emoji size filter: inline images in HTML must be small custom emoji.

As policyserv's ``InlineEmojiSizeFilter``, for ``m.room.message`` with a non-empty
``formatted_body``: every ``<img>`` must carry ``data-mx-emoticon`` (any value) and
exactly one ``height`` made of ASCII digits only, at most
``inline_emoji_size_filter_max_height_pixels`` (so "32px", a negative or a second
``height`` fail). Anything else is spam and spec non-compliance: clients ignore an
invalid height, so the image could be any size.

policyserv forces this filter on; here too it is always enabled (raise the maximum to
loosen it).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, declare
from warden.policy.harms import SPAM, SPEC_NON_COMPLIANCE

(MAX_HEIGHT,) = declare(
    ConfigKey(
        "inline_emoji_size_filter_max_height_pixels",
        "int",
        32,
        "Largest height (pixels) an inline emoji <img> in formatted_body may declare; "
        "an <img> that is not an emoji (data-mx-emoticon) or has no valid height is "
        "refused. Always on.",
    ),
)

_DIGITS = re.compile(r"[0-9]+")
# Cheap test before parsing: most formatted bodies hold no image at all.
_IMG_HINT = re.compile(r"<img", re.IGNORECASE)


class _BadImageFinder(HTMLParser):
    """Stops at the first ``<img>`` that is not a valid, small enough inline emoji."""

    def __init__(self, max_height: int) -> None:
        super().__init__(convert_charrefs=True)
        self.max_height = max_height
        self.found = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.found or tag != "img":
            return
        emoticon = False
        heights = 0
        for name, value in attrs:  # names come lower-cased; duplicates are kept
            if name == "data-mx-emoticon":
                emoticon = True
            elif name == "height":
                heights += 1
                size = value or ""
                if heights > 1 or not _DIGITS.fullmatch(size) or int(size) > self.max_height:
                    self.found = True
                    return
        if not emoticon or heights == 0:
            self.found = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


def has_bad_inline_image(html: str, max_height: int) -> bool:
    """Whether ``html`` holds an ``<img>`` that is not a valid emoji of at most
    ``max_height`` pixels."""
    if _IMG_HINT.search(html) is None:
        return False
    finder = _BadImageFinder(max_height)
    finder.feed(html)
    finder.close()
    return finder.found


class InlineEmojiSizeFilter(Filter):
    """Prohibits messages whose HTML holds a non-emoji or too tall inline image."""

    name = "inline_emoji_size"
    group = Group.MAIN
    harm_ids = (SPAM, SPEC_NON_COMPLIANCE)
    waits_on_io = False

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited on the first bad ``<img>`` of ``formatted_body``."""
        if ctx.event_type != "m.room.message":
            return FilterResult.neutral()
        html = ctx.string_field("formatted_body")
        if html and has_bad_inline_image(html, ctx.config.get_int(MAX_HEIGHT.name)):
            return FilterResult.prohibited(SPAM, SPEC_NON_COMPLIANCE)
        return FilterResult.neutral()

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
from html import unescape

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
# Cheap test before scanning: most formatted bodies hold no image at all.
_IMG_HINT = re.compile(r"<img", re.IGNORECASE)
_SPACE = " \t\n\f\r"


def _skip(html: str, pos: int, chars: str) -> int:
    n = len(html)
    while pos < n and html[pos] in chars:
        pos += 1
    return pos


def _until(html: str, pos: int, stops: str) -> int:
    n = len(html)
    while pos < n and html[pos] not in stops:
        pos += 1
    return pos


def _read_tag(html: str, pos: int) -> tuple[str, list[tuple[str, str]], int] | None:
    """The start tag at ``pos`` (just after ``<``): lower-cased name, attributes (names
    lower-cased, values unescaped) and the position after ``>``; None when the input
    ends inside the tag (an HTML tokenizer then emits no tag)."""
    end = _until(html, pos, _SPACE + "/>")
    name = html[pos:end].lower()
    pos = end
    attrs: list[tuple[str, str]] = []
    n = len(html)
    while True:
        pos = _skip(html, pos, _SPACE + "/")
        if pos >= n:
            return None
        if html[pos] == ">":
            return name, attrs, pos + 1
        # A name runs to whitespace, "/", ">" or "=" (a leading "=" belongs to it).
        end = _until(html, pos + 1, _SPACE + "/>=")
        attr = html[pos:end].lower()
        pos = _skip(html, end, _SPACE)
        value = ""
        if pos < n and html[pos] == "=":
            pos = _skip(html, pos + 1, _SPACE)
            if pos < n and html[pos] in "\"'":
                close = html.find(html[pos], pos + 1)
                if close < 0:
                    return None
                value, pos = html[pos + 1 : close], close + 1
            else:
                end = _until(html, pos, _SPACE + ">")
                value, pos = html[pos:end], end
        attrs.append((attr, unescape(value)))


def _bad_image(attrs: list[tuple[str, str]], max_height: int) -> bool:
    emoticon = False
    heights = 0
    for name, value in attrs:
        if name == "data-mx-emoticon":
            emoticon = True  # any value
        elif name == "height":
            heights += 1
            if heights > 1 or not _DIGITS.fullmatch(value) or int(value) > max_height:
                return True
    return not emoticon or heights == 0


def has_bad_inline_image(html: str, max_height: int) -> bool:
    """Whether ``html`` holds an ``<img>`` that is not a valid emoji of at most
    ``max_height`` pixels.

    A small tokenizer of its own, after the HTML tokenizer policyserv uses (Go's
    ``x/net/html``): start tags with their attributes, comments and other markup
    skipped. Each character is read once, so any body costs linear time (Python's
    ``HTMLParser`` takes seconds on a body of repeated ``<img``). Elements whose content
    is raw text (``<script>``, ``<style>``…) are not special here, so an ``<img>``
    inside one counts: stricter, never laxer.
    """
    if _IMG_HINT.search(html) is None:
        return False
    pos, n = 0, len(html)
    while True:
        lt = html.find("<", pos)
        if lt < 0 or lt + 1 >= n:
            return False
        nxt = html[lt + 1]
        if nxt.isascii() and nxt.isalpha():
            tag = _read_tag(html, lt + 1)
            if tag is None:
                return False
            name, attrs, pos = tag
            if name == "img" and _bad_image(attrs, max_height):
                return True
        elif html.startswith("<!--", lt):
            close = html.find("-->", lt + 4)
            if close < 0:
                return False
            pos = close + 3
        elif nxt in "/!?":
            # An end tag, a declaration or a bogus comment: up to the next ">".
            close = html.find(">", lt + 2)
            if close < 0:
                return False
            pos = close + 1
        else:
            pos = lt + 1  # a "<" of text


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

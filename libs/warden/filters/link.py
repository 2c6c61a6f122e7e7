"""Link filter: URLs in an event's content checked against deny and allow globs.

As policyserv's ``LinkFilter``: URLs are the matches of ``https?://`` followed by
characters other than ASCII whitespace, ``"``, ``<``, ``>`` and a backtick, searched in
the content's JSON (canonical here, see ``FilterContext.content_json``). A URL matching
a ``link_filter_denied_url_globs`` glob is spam (deny wins); when
``link_filter_allowed_url_globs`` is set, a URL matching none of them is spam too.

The globs are policyserv's (``github.com/ryanuber/go-glob``): only ``*`` is a wildcard,
so ``?`` (common in URLs) is literal, unlike Matrix globs (``warden.matrix.globs``).
They are matched the same bounded way: the glob is split at its stars and each piece is
found leftmost after the one before, so one match costs a few ``str.find`` calls, never
backtracking whatever a community writes.
"""

from __future__ import annotations

import re
from functools import lru_cache

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM

ALLOWED_GLOBS, DENIED_GLOBS = declare(
    ConfigKey(
        "link_filter_allowed_url_globs",
        "list[str]",
        [],
        "When set, a URL in an event's content must match one of these globs (* is the "
        "only wildcard), or the event is spam.",
    ),
    ConfigKey(
        "link_filter_denied_url_globs",
        "list[str]",
        [],
        "A URL in an event's content matching one of these globs (* is the only "
        "wildcard) makes the event spam; checked before the allow list.",
    ),
)

# Go RE2's \s is ASCII whitespace only: \t \n \f \r and space.
URL = re.compile(r"https?://[^\t\n\f\r \"<>`]+")


@lru_cache(maxsize=1024)
def _pieces(glob: str) -> tuple[str, ...]:
    return tuple(glob.split("*"))


def star_glob_matches(glob: str, value: str) -> bool:
    """Whether ``value`` matches ``glob`` where ``*`` is any run and nothing else is
    special (go-glob's semantics, with leftmost matching of the middle pieces)."""
    if glob == "":
        return value == ""
    if glob == "*":
        return True
    pieces = _pieces(glob)
    if len(pieces) == 1:
        return value == glob
    head, *middle, tail = pieces
    if not value.startswith(head):
        return False
    pos = len(head)
    end = len(value) - len(tail)
    if end < pos or not value.endswith(tail):
        return False
    for piece in middle:
        found = value.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def url_allowed(url: str, allowed: list[str], denied: list[str]) -> bool:
    """policyserv's rule: a deny match refuses; else a set allow list must match."""
    if any(star_glob_matches(g, url) for g in denied):
        return False
    if allowed:
        return any(star_glob_matches(g, url) for g in allowed)
    return True


class LinkFilter(Filter):
    """Prohibits (spam) events whose content links to a denied or not-allowed URL."""

    name = "link"
    checks_text = True
    waits_on_io = False
    group = Group.MAIN
    harm_ids = (SPAM,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while either glob list is non-empty."""
        return bool(config.get_list(ALLOWED_GLOBS.name) or config.get_list(DENIED_GLOBS.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited on the first URL that is not allowed."""
        text = ctx.content_json
        if "http" not in text:
            return FilterResult.neutral()
        allowed = ctx.config.get_list(ALLOWED_GLOBS.name)
        denied = ctx.config.get_list(DENIED_GLOBS.name)
        for match in URL.finditer(text):
            if not url_allowed(match.group(), allowed, denied):
                return FilterResult.prohibited(SPAM)
        return FilterResult.neutral()

"""User ID words filter: a sender localpart made of too many words.

As policyserv's ``UserIdContainsWordsFilter``: the words are the runs of ASCII letters
and digits (``[A-Za-z0-9]+``) in the sender's localpart, so ``buy.cheap_pills-now``
holds four; more than ``user_id_contains_words_filter_max_words`` (>) is flooding. Any
event type; zero or negative disables.
"""

from __future__ import annotations

import re

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING

(MAX_WORDS,) = declare(
    ConfigKey(
        "user_id_contains_words_filter_max_words",
        "int",
        0,
        "Events whose sender's localpart holds more than this many words (runs of ASCII "
        "letters and digits) are flooding. Zero or negative disables.",
    ),
)

_WORD = re.compile(r"[A-Za-z0-9]+")


def localpart_words(user_id: str) -> int:
    """How many ``[A-Za-z0-9]+`` runs the localpart of ``user_id`` holds."""
    localpart = user_id[1:].partition(":")[0] if user_id.startswith("@") else ""
    return len(_WORD.findall(localpart))


class UserIdContainsWordsFilter(Filter):
    """Prohibits events from senders whose localpart holds too many words."""

    name = "user_id_contains_words"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)
    waits_on_io = False

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the maximum is positive."""
        return config.get_int(MAX_WORDS.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when the localpart's word count > the maximum."""
        if localpart_words(ctx.sender) > ctx.config.get_int(MAX_WORDS.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

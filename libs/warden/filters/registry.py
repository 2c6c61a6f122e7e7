"""The registry of filters. Importing it registers every filter and its config keys.

``FILTERS`` lists the filter classes in pipeline order (by group, then as listed); the
order within a group does not change results because a group's filters run
concurrently and combine by maximum.
"""

from __future__ import annotations

from collections.abc import Mapping

import warden.policy.moderation_bot  # noqa: F401  (declares moderation_bot_user_id)
from warden.filters.base import Filter, Group
from warden.filters.density import DensityFilter
from warden.filters.event_type_prefilter import EventTypePrefilter
from warden.filters.frequency import FrequencyFilter
from warden.filters.hellban_postfilter import HellbanPostfilter
from warden.filters.hellban_prefilter import HellbanPrefilter
from warden.filters.hma import HmaFilter
from warden.filters.inline_emoji_size import InlineEmojiSizeFilter
from warden.filters.invite_rate import InviteRateFilter
from warden.filters.join_rate import JoinRateFilter
from warden.filters.keyword import KeywordFilter
from warden.filters.keyword_template import KeywordTemplateFilter
from warden.filters.length import LengthFilter
from warden.filters.link import LinkFilter
from warden.filters.many_ats import ManyAtsFilter
from warden.filters.media import MediaFilter
from warden.filters.mention_frequency import MentionFrequencyFilter
from warden.filters.mentions import MentionsFilter
from warden.filters.moderation_prefilter import ModerationPrefilter
from warden.filters.openai_moderation import OpenAIModerationFilter
from warden.filters.policy_list import PolicyListFilter
from warden.filters.protect_own_user import ProtectOwnUser
from warden.filters.sender_prefilter import SenderPrefilter
from warden.filters.sticky_events import StickyEventsFilter
from warden.filters.trim_length import TrimLengthFilter
from warden.filters.unsafe_signing_key import UnsafeSigningKeyFilter
from warden.filters.untrusted_media import UntrustedMediaFilter
from warden.filters.user_id_contains_words import UserIdContainsWordsFilter
from warden.filters.user_id_length import UserIdLengthFilter
from warden.policy import filter_scope  # noqa: F401  (declares dry_run_filters, filter_conditions)

_ALL: tuple[type[Filter], ...] = (
    ProtectOwnUser,
    EventTypePrefilter,
    SenderPrefilter,
    UnsafeSigningKeyFilter,
    PolicyListFilter,
    ModerationPrefilter,
    HellbanPrefilter,
    KeywordFilter,
    KeywordTemplateFilter,
    MentionsFilter,
    ManyAtsFilter,
    LengthFilter,
    TrimLengthFilter,
    DensityFilter,
    MediaFilter,
    UntrustedMediaFilter,
    FrequencyFilter,
    JoinRateFilter,
    InviteRateFilter,
    InlineEmojiSizeFilter,
    MentionFrequencyFilter,
    StickyEventsFilter,
    LinkFilter,
    UserIdContainsWordsFilter,
    UserIdLengthFilter,
    OpenAIModerationFilter,
    HmaFilter,
    HellbanPostfilter,
)

FILTERS: tuple[type[Filter], ...] = tuple(sorted(_ALL, key=lambda f: int(f.group)))

BY_NAME: Mapping[str, type[Filter]] = {f.name: f for f in FILTERS}
if len(BY_NAME) != len(FILTERS):
    raise RuntimeError("two filters share a name")


def filters_in_group(group: Group) -> tuple[type[Filter], ...]:
    """The registered filters of one group, in order."""
    return tuple(f for f in FILTERS if f.group is group)

"""Event-type prefilter: listed event types skip the content filters.

policyserv's ``EventTypeFilter``. The state list applies when the event has a
``state_key`` (even ""), the other list when it has none.
"""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare

ALLOWED_EVENT_TYPES, ALLOWED_STATE_EVENT_TYPES = declare(
    ConfigKey(
        "event_type_prefilter_allowed_event_types",
        "list[str]",
        ["m.room.redaction"],
        "Non-state event types that are always allowed (skip hellban and content filters). "
        "Empty, together with the state list, disables the filter.",
    ),
    ConfigKey(
        "event_type_prefilter_allowed_state_event_types",
        "list[str]",
        [
            "m.room.power_levels",
            "m.room.avatar",
            "m.room.name",
            "m.room.topic",
            "m.room.join_rules",
            "m.room.history_visibility",
            "m.room.create",
            "m.room.server_acl",
            "m.room.tombstone",
            "m.room.encryption",
            "m.room.canonical_alias",
        ],
        "State event types that are always allowed (skip hellban and content filters).",
    ),
)


class EventTypePrefilter(Filter):
    """Allows the configured event types."""

    name = "event_type_prefilter"
    waits_on_io = False
    group = Group.PREFILTER
    harm_ids = ()

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while either list is non-empty."""
        return bool(
            config.get_list(ALLOWED_EVENT_TYPES.name)
            or config.get_list(ALLOWED_STATE_EVENT_TYPES.name)
        )

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Allowed when the event's type is in the list for its kind (state or not)."""
        key = ALLOWED_STATE_EVENT_TYPES if ctx.is_state else ALLOWED_EVENT_TYPES
        if ctx.event_type in ctx.config.get_list(key.name):
            return FilterResult.allowed()
        return FilterResult.neutral()

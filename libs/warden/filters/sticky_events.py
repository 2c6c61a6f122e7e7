"""Sticky events filter: refuses MSC4354 sticky events unless the community allows them.

An event is sticky while ``min(origin_server_ts, now) + duration`` lies in the future,
where the duration is the top-level ``sticky.duration_ms`` (or the unstable
``msc4354_sticky``), clamped to [0, 1 hour] as MSC4354 says. "Now" is the time Warden
first saw the event (``FilterContext.now_ms``), so a re-evaluation judges it the same.
Both fields are top-level, so the content hash covers them.

``sticky_events_filter_allow_sticky_events`` defaults to true, which leaves the filter
off, as in policyserv.
"""

from __future__ import annotations

from typing import Any

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import OTHER

(ALLOW_STICKY,) = declare(
    ConfigKey(
        "sticky_events_filter_allow_sticky_events",
        "bool",
        True,
        "When false, sticky events (MSC4354) are refused. True (the default) leaves the "
        "filter off.",
    ),
)

MAX_STICKY_DURATION_MS = 3_600_000
STICKY_FIELDS = ("sticky", "msc4354_sticky")


def sticky_duration_ms(event: dict[str, Any]) -> int | None:
    """The event's sticky duration clamped to [0, 1 h], or None when it is not sticky."""
    for field_name in STICKY_FIELDS:
        sticky = event.get(field_name)
        if not isinstance(sticky, dict):
            continue
        duration = sticky.get("duration_ms")
        if isinstance(duration, int) and not isinstance(duration, bool):
            return min(max(duration, 0), MAX_STICKY_DURATION_MS)
    return None


def is_sticky(event: dict[str, Any], now_ms: int) -> bool:
    """Whether ``event`` is still sticky at ``now_ms`` (MSC4354)."""
    duration = sticky_duration_ms(event)
    if duration is None:
        return False
    ts = event.get("origin_server_ts")
    start = min(ts, now_ms) if isinstance(ts, int) and not isinstance(ts, bool) else now_ms
    return start + duration > now_ms


class StickyEventsFilter(Filter):
    """Prohibits (``other``) sticky events when the community does not allow them."""

    name = "sticky_events"
    group = Group.MAIN
    harm_ids = (OTHER,)
    waits_on_io = False

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On when sticky events are not allowed."""
        return not config.get_bool(ALLOW_STICKY.name)

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited while the event is sticky."""
        if is_sticky(ctx.event, ctx.now_ms):
            return FilterResult.prohibited(OTHER)
        return FilterResult.neutral()

"""Join rate: too many users joining one room within a minute (a raid).

Homeservers now ask ``/sign`` about membership events (see docs/filters.md). A join is an
``m.room.member`` event with membership ``join`` sent by the joining user
(``state_key`` = ``sender``). Each room has one 60 s window in Redis shared by every
worker (``warden.redis_keys.join_rate``, ``warden.storage.rate_windows``), counted by
event ID so an event evaluated again never counts twice. The join that takes the room
past ``join_rate_filter_max_joins_per_minute`` joins in the last 60 s (itself included)
is refused, and so is every further join until the window drains; refused joins count
too, so a raid keeps the window closed while it lasts.

Not counted: a join by a user the room's learned (verified) state already has as joined
by an earlier event (that is a display name or avatar change, not a join; one
PostgreSQL lookup, only for joins and only while the filter is on; a profile change
learned from ``/send`` before anyone asked about it counts as a join), and a join whose
sender is not verified (``FilterContext.sender_verified``), which is only measured
against the window.
"""

from __future__ import annotations

from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING
from warden.storage.member_lookup import learned_membership
from warden.storage.rate_windows import count_event

(MAX_JOINS,) = declare(
    ConfigKey(
        "join_rate_filter_max_joins_per_minute",
        "int",
        0,
        "Joins one room may take in 60 s; a join past it is flooding. Zero disables.",
    ),
)


class JoinRateFilter(Filter):
    """Prohibits joins past ``join_rate_filter_max_joins_per_minute`` per room."""

    name = "join_rate"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the limit is positive."""
        return config.get_int(MAX_JOINS.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Count this join in the room's window; prohibited past the limit."""
        if ctx.event_type != "m.room.member" or ctx.content.get("membership") != "join":
            return FilterResult.neutral()
        sender = ctx.sender
        if not sender or ctx.event.get("state_key") != sender or not ctx.room_id:
            return FilterResult.neutral()
        learned = await learned_membership(ctx.deps.pool, ctx.room_id, sender)
        # Joined by an earlier event: this one is a profile change. The room-state
        # consumer learns a /send PDU before it is judged, so a membership set by this
        # very event is still a join.
        if learned is not None and learned[0] == "join" and learned[1] != ctx.event_id:
            return FilterResult.neutral()
        count = await count_event(
            ctx.deps.auto_pipeline,
            redis_keys.join_rate(ctx.room_id),
            ctx.event_id,
            ctx.now_ms,
            add=ctx.sender_verified,
        )
        if count > ctx.config.get_int(MAX_JOINS.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

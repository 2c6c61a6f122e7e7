"""Invite rate: one sender inviting too many users within a minute (invite spam).

An invite is an ``m.room.member`` event with membership ``invite``. Each sender has one
60 s window per community in Redis shared by every worker
(``warden.redis_keys.invite_rate``, ``warden.storage.rate_windows``), counted by event
ID so an event evaluated again never counts twice. The invite that takes the sender past
``invite_rate_filter_max_invites_per_minute`` invites in the last 60 s (itself included)
is refused, and so is every further one until the window drains.

An invite whose sender is not verified (a third-party invite nothing vouches for, see
``FilterContext.sender_verified``) is not counted, so nobody can fill another user's
window; it is still refused while that sender's window is full.
"""

from __future__ import annotations

from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import SPAM_FLOODING
from warden.storage.rate_windows import count_event

(MAX_INVITES,) = declare(
    ConfigKey(
        "invite_rate_filter_max_invites_per_minute",
        "int",
        0,
        "Invites one sender may send in the community in 60 s; an invite past it is "
        "flooding. Zero disables.",
    ),
)


class InviteRateFilter(Filter):
    """Prohibits invites past ``invite_rate_filter_max_invites_per_minute`` per sender."""

    name = "invite_rate"
    group = Group.MAIN
    harm_ids = (SPAM_FLOODING,)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the limit is positive."""
        return config.get_int(MAX_INVITES.name) > 0

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Count this invite in the sender's window; prohibited past the limit."""
        if ctx.event_type != "m.room.member" or ctx.content.get("membership") != "invite":
            return FilterResult.neutral()
        if not ctx.sender:
            return FilterResult.neutral()
        count = await count_event(
            ctx.deps.auto_pipeline,
            redis_keys.invite_rate(ctx.community_id, ctx.sender),
            ctx.event_id,
            ctx.now_ms,
            add=ctx.sender_verified,
        )
        if count > ctx.config.get_int(MAX_INVITES.name):
            return FilterResult.prohibited(SPAM_FLOODING)
        return FilterResult.neutral()

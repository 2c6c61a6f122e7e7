"""Protect Warden's own user: nobody else may kick or ban it.

policyserv's ``ProtectLocalUserFilter`` (always on, a prefilter, so it wins even over an
allow-listed sender: prohibited beats allowed). Warden's user is
``@<PS_JOIN_LOCALPART>:<PS_HOMESERVER_NAME>``. policyserv also refuses *invites* of its
user; Warden lets invites through to the other filters, because inviting the policy
server is how a room asks it in.
"""

from __future__ import annotations

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.harms import OTHER

# Memberships that remove Warden's user when someone else sets them.
_REMOVALS = frozenset({"leave", "ban"})


class ProtectOwnUser(Filter):
    """Refuses kicks and bans of Warden's user."""

    name = "protect_own_user"
    waits_on_io = False
    group = Group.PREFILTER
    harm_ids = (OTHER,)

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when another user sets our membership to leave or ban."""
        if ctx.event_type != "m.room.member":
            return FilterResult.neutral()
        own = ctx.deps.local_user_id
        if ctx.event.get("state_key") != own or ctx.sender == own:
            return FilterResult.neutral()
        if ctx.content.get("membership") in _REMOVALS:
            return FilterResult.prohibited(OTHER)
        return FilterResult.neutral()

"""Moderation prefilter: a room's moderators are never refused by content filters.

Homeservers now ask ``/sign`` about membership events, so Warden sees kicks and bans. A
moderator's kick of a spammer whose reason quotes the spam, or a ban that trips the
keyword filter, must still go through. This prefilter answers **allowed** (which skips
the hellban prefilter and the content filters) for:

* a kick (``m.room.member`` ``leave`` of another user, an unban included) or a ban;
* an ``m.room.redaction`` by a user with the room's ``redact`` level (redacting others);
* an ``m.room.power_levels`` change;

when the room's learned state (``warden.storage.room_state``: written only from
verified PDUs that passed the auth rules, and from verified snapshots) says the sender
may do it: the auth rules of ``warden.matrix.state_auth.check_event`` pass against that
state (the sender is joined, has the kick/ban/event level, outranks the target, changes
no level beyond their own). A room Warden knows nothing of, a sender not proven to have
sent the event (``FilterContext.sender_verified``) or a room version Warden does not
know gets no exemption: the event is judged like any other.

Prefilters combine by maximum, so a refusal by ``protect_own_user`` (kicking or banning
Warden's user) or ``policy_list`` (a banned moderator) still wins.

Cost: other event types return at once without I/O, so the filter is marked as not
waiting on I/O (no task, no timer per event). The state lookup for the few moderation
events is bounded by its own timeout; a slow or failed database makes the evaluation
unavailable (503 and judged again), as for any filter's dependency failure, rather than
judging without it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.matrix.room_versions import get_room_version
from warden.matrix.state_auth import AuthState, check_event
from warden.policy.dependency_failures import DependencyUnavailable
from warden.storage.room_state import load_auth_state

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 2.0

MODERATION_CHECKS = Counter(
    "warden_moderation_prefilter_checks_total",
    "Moderation events (kicks, bans, redactions, power level changes) the moderation "
    "prefilter looked at, by outcome: allowed (the learned state lets the sender do it), "
    "not_permitted, unverified (sender not proven or room version unknown), failed "
    "(the state lookup failed: judged like any other event).",
    ["outcome"],
)

MEMBER = "m.room.member"
REDACTION = "m.room.redaction"
POWER_LEVELS = "m.room.power_levels"


def moderation_kind(event: dict[str, Any]) -> str | None:
    """``kick``, ``ban``, ``redaction`` or ``power_levels`` for a moderation event, else
    None. Only a dictionary lookup or two: this runs for every event."""
    event_type = event.get("type")
    if event_type == MEMBER:
        content = event.get("content")
        membership = content.get("membership") if isinstance(content, dict) else None
        if membership == "ban":
            return "ban"
        if membership == "leave" and event.get("state_key") != event.get("sender"):
            return "kick"
        return None
    if event_type == REDACTION:
        return "redaction" if "state_key" not in event else None
    if event_type == POWER_LEVELS:
        return "power_levels" if event.get("state_key") == "" else None
    return None


def may_moderate(event: dict[str, Any], kind: str, state: AuthState) -> bool:
    """Whether the learned ``state`` lets the event's sender do this moderation."""
    if check_event(event, state) is not None:
        return False
    if kind == "redaction":
        # Redacting one's own events needs no power; moderation is redacting others'.
        sender = event.get("sender")
        return isinstance(sender, str) and state.user_level(sender) >= state.required("redact", 50)
    return True


class ModerationPrefilter(Filter):
    """Allows kicks, bans, redactions and power level changes the sender may make."""

    name = "moderation_prefilter"
    group = Group.PREFILTER
    # It awaits PostgreSQL only for moderation events, under its own timeout (see above).
    waits_on_io = False
    harm_ids = ()

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Allowed when the learned state says the sender may moderate so."""
        kind = moderation_kind(ctx.event)
        if kind is None:
            return FilterResult.neutral()
        if not ctx.sender_verified or not ctx.room_id:
            MODERATION_CHECKS.labels("unverified").inc()
            return FilterResult.neutral()
        try:
            version = get_room_version(ctx.room_version)
        except ValueError:
            MODERATION_CHECKS.labels("unverified").inc()
            return FilterResult.neutral()
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):
                state = await load_auth_state(ctx.deps.pool, ctx.room_id, version, ctx.event)
        except Exception as exc:
            # Failures are not verdicts: judging a moderator's kick without its exemption
            # could refuse it forever. A slow or failed database makes the whole
            # evaluation unavailable (503, judged again on the next ask).
            MODERATION_CHECKS.labels("failed").inc()
            logger.warning(
                "moderation state lookup failed",
                extra={"event_id": ctx.event_id, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            if isinstance(exc, TimeoutError):
                raise DependencyUnavailable("learned room state lookup timed out") from exc
            raise
        if may_moderate(ctx.event, kind, state):
            MODERATION_CHECKS.labels("allowed").inc()
            return FilterResult.allowed()
        MODERATION_CHECKS.labels("not_permitted").inc()
        return FilterResult.neutral()

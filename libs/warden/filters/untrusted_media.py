"""Untrusted-media filter: media is refused unless a trust source trusts the sender.

policyserv's ``UntrustedMediaFilter`` (reference §3.5). An event is media as for the
media filter, with its own list (``untrusted_media_filter_media_types``: event types, and
``m.room.message`` msgtypes). For media, the trust sources are asked in policyserv's
order (``warden.trust``):

1. the community's globs: ``..._denied_user_globs`` makes the sender untrusted whatever
   the other sources say (deny wins), ``..._allowed_user_globs`` trusts them;
2. Muninn Hall (when ``..._use_muninn``): the sender's server is a member;
3. when ``..._use_power_levels``: the sender is a room version 12+ creator, or has a
   learned power level (their own, else ``users_default``) at least ``state_default``.

A trusted sender's media gets no opinion (neutral); anyone else's is refused like the
media filter's (spam + ``org.matrix.policyserv.media``). Only the first source can say
"untrusted", so the first "trusted" ends the search.

Pitfall (policyserv issue #94): the plain media filter (``media_filter_media_types``)
is on by default and refuses media whoever sends it, so a trust grant here changes
nothing until that list is emptied. See the filter table in docs/filters.md.

Room-derived trust comes from Warden's learned state (written only from verified PDUs
that passed the auth rules and verified snapshots). A sender nothing proved sent the
event (``FilterContext.sender_verified`` false) is trusted by no source.

Cost: other events return at once without I/O; for media the Muninn directory is in
memory (``FilterDeps.muninn``) and the room's create event and power levels are one
query, cached for a few seconds (``FilterDeps.room_trust``), under a timeout of their
own. A failed lookup makes the evaluation unavailable (judged again), never a verdict.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from prometheus_client import Counter

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.matrix.room_versions import get_room_version
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.dependency_failures import DependencyUnavailable
from warden.policy.harms import MEDIA, SPAM
from warden.trust.sources import Tristate, creator, muninn, power_levels, self_directed

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 2.0

MEDIA_TYPES, USE_MUNINN, USE_POWER_LEVELS, ALLOWED_GLOBS, DENIED_GLOBS = declare(
    ConfigKey(
        "untrusted_media_filter_media_types",
        "list[str]",
        ["m.sticker", "m.image", "m.video", "m.file", "m.audio"],
        "Event types, and m.room.message msgtypes, refused as media unless the sender "
        "is trusted. Empty disables.",
    ),
    ConfigKey(
        "untrusted_media_filter_use_muninn",
        "bool",
        True,
        "Trust users whose server is in the Muninn Hall member directory.",
    ),
    ConfigKey(
        "untrusted_media_filter_use_power_levels",
        "bool",
        True,
        "Trust room version 12+ creators and users whose power level is at least the "
        "room's state_default.",
    ),
    ConfigKey(
        "untrusted_media_filter_allowed_user_globs",
        "list[str]",
        [],
        "User ID globs (* is the only wildcard) trusted to send media.",
    ),
    ConfigKey(
        "untrusted_media_filter_denied_user_globs",
        "list[str]",
        [],
        "User ID globs (* is the only wildcard) never trusted to send media, whatever "
        "other sources say.",
    ),
)

UNTRUSTED_MEDIA_CHECKS = Counter(
    "warden_untrusted_media_checks_total",
    "Media events the untrusted-media filter judged, by the source that trusted the "
    "sender (globs, muninn, creator, power_levels) or why not (denied, untrusted).",
    ["outcome"],
)


def is_media(ctx: FilterContext, types: Sequence[str]) -> bool:
    """Whether the event's type, or an ``m.room.message``'s msgtype, is listed."""
    if ctx.event_type in types:
        return True
    if ctx.event_type == "m.room.message":
        msgtype = ctx.string_field("msgtype")
        return bool(msgtype) and msgtype in types
    return False


class UntrustedMediaFilter(Filter):
    """Prohibits listed media types unless a trust source trusts the sender."""

    name = "untrusted_media"
    group = Group.MAIN
    # It may await PostgreSQL for media events only: those run as an I/O filter's (the
    # filter timeout bounds them), every other event inline with no task or timer.
    waits_on_io = False
    waits_on_io_sometimes = True
    harm_ids = (SPAM, MEDIA)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the media type list is non-empty."""
        return bool(config.get_list(MEDIA_TYPES.name))

    def waits_for(self, ctx: FilterContext) -> bool:
        """Media events may need a lookup; nothing else does."""
        return is_media(ctx, ctx.config[MEDIA_TYPES.name])

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Neutral for non-media and trusted senders; prohibited (spam + media) else."""
        if not is_media(ctx, ctx.config[MEDIA_TYPES.name]):
            return FilterResult.neutral()
        outcome = await self._trusted_by(ctx) if ctx.sender_verified else "untrusted"
        UNTRUSTED_MEDIA_CHECKS.labels(outcome).inc()
        logger.debug("untrusted media check", extra={"event_id": ctx.event_id, "outcome": outcome})
        if outcome in ("denied", "untrusted"):
            return FilterResult.prohibited(SPAM, MEDIA)
        return FilterResult.neutral()

    async def _trusted_by(self, ctx: FilterContext) -> str:
        sender = ctx.sender
        config = ctx.config
        answer = self_directed(
            sender, config.get_list(ALLOWED_GLOBS.name), config.get_list(DENIED_GLOBS.name)
        )
        if answer is Tristate.FALSE:
            return "denied"
        if answer is Tristate.TRUE:
            return "globs"
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):
                if config.get_bool(USE_MUNINN.name):
                    servers = await ctx.deps.muninn.servers()
                    if muninn(sender, servers) is Tristate.TRUE:
                        return "muninn"
                if config.get_bool(USE_POWER_LEVELS.name) and ctx.room_id:
                    try:
                        version = get_room_version(ctx.room_version)
                    except ValueError:
                        return "untrusted"  # a room version Warden does not know
                    room = await ctx.deps.room_trust.get(ctx.room_id)
                    state = room.auth_state(version)
                    if creator(sender, state) is Tristate.TRUE:
                        return "creator"
                    if power_levels(sender, state) is Tristate.TRUE:
                        return "power_levels"
        except TimeoutError as exc:
            raise DependencyUnavailable("trust source lookup timed out") from exc
        return "untrusted"

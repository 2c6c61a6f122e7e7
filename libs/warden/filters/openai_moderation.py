"""OpenAI moderation filter: text judged by an OpenAI-compatible moderation model.

policyserv's ``OpenAIOmniFilter`` (reference §3.6). It runs only in the rooms the
operator lists in ``PS_OPENAI_FILTER_ALLOWED_ROOM_IDS`` (an instance-only key: no
community can send other rooms' messages to a third party, and listed rooms are on by
default, "forced" as in policyserv) and, like every filter, where the community's
``filter_conditions`` let it (``dry_run_filters`` applies too). It needs the API key
setting (``warden.openai_moderation``); without one it judges nothing.

What is sent: one request per text rendering of the event, each holding the rendering
and the model name, nothing else (no event ID, room ID or media):

- ``m.room.message`` of msgtype ``m.text`` or ``m.notice``: ``"<sender> says: <body>"``,
  and, when there is a ``formatted_body``, ``"<sender> says: <formatted_body>"``;
- ``m.emote``: the same with ``"<sender> says: /me <body>"``;
- ``m.reaction``: ``"<sender> reacted with <m.relates_to.key>"``.

Other events are not sent. A rendering the service flags refuses the event as ``spam``,
plus ``child_safety.csam`` when it sets the ``sexual/minors`` category.

A failure of the service (timeout, error answer, too many events in flight) is a
dependency failure: with ``openai_filter_fail_secure`` true (the default) the event gets
no verdict and is judged again on the next ask (503 meanwhile); false, the filter counts
as neutral. policyserv refuses the event as spam instead; Warden never stores a failure
as a verdict.
"""

from __future__ import annotations

from typing import Any

from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.policy.config import ConfigError, ConfigKey, EffectiveConfig, declare
from warden.policy.harms import CHILD_SAFETY_CSAM, SPAM

MAX_ALLOWED_ROOMS = 10_000


def _validate_rooms(value: Any) -> list[str]:
    rooms: list[str] = list(value)
    if len(rooms) > MAX_ALLOWED_ROOMS:
        raise ConfigError(ALLOWED_ROOM_IDS.name, f"at most {MAX_ALLOWED_ROOMS} rooms")
    for room_id in rooms:
        if not room_id.startswith("!") or len(room_id) < 2 or len(room_id.encode()) > 255:
            raise ConfigError(ALLOWED_ROOM_IDS.name, f"{room_id!r} is not a room ID")
    return list(dict.fromkeys(rooms))


(ALLOWED_ROOM_IDS,) = declare(
    ConfigKey(
        "openai_filter_allowed_room_ids",
        "list[str]",
        [],
        "Rooms whose text is sent to the OpenAI-compatible moderation service, and which "
        "are forced to use it (policyserv's PS_OPENAI_FILTER_ALLOWED_ROOM_IDS). Empty: "
        "the filter is off. Instance only.",
        instance_only=True,
        validate=_validate_rooms,
    ),
)

# The category that adds the CSAM harm (OpenAI's name; compatible services use it too).
SEXUAL_MINORS = "sexual/minors"
_TEXT_MSGTYPES = frozenset({"m.text", "m.notice"})
_EMOTE = "m.emote"


def renderings(ctx: FilterContext) -> list[str]:
    """The texts sent for this event (policyserv's ``RenderToText``); [] for none."""
    sender = ctx.sender
    if ctx.event_type == "m.reaction":
        relates = ctx.content.get("m.relates_to")
        key = relates.get("key") if isinstance(relates, dict) else None
        return [f"{sender} reacted with {key}"] if isinstance(key, str) and key else []
    if ctx.event_type != "m.room.message":
        return []
    msgtype = ctx.string_field("msgtype")
    if msgtype in _TEXT_MSGTYPES:
        prefix = f"{sender} says: "
    elif msgtype == _EMOTE:
        prefix = f"{sender} says: /me "
    else:
        return []
    texts = [prefix + body for body in (ctx.string_field("body"),) if body]
    formatted = ctx.string_field("formatted_body")
    if formatted:
        texts.append(prefix + formatted)
    return texts


class OpenAIModerationFilter(Filter):
    """Refuses text an OpenAI-compatible moderation model flags."""

    # policyserv's name, so its community key openai_filter_fail_secure keeps working.
    name = "openai_filter"
    group = Group.MAIN
    harm_ids = (SPAM, CHILD_SAFETY_CSAM)

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On when the operator lists rooms (it still runs only in those rooms)."""
        return bool(config.get(ALLOWED_ROOM_IDS.name))

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Classify the event's renderings when its room is listed."""
        client = ctx.deps.openai_moderation
        if client is None or ctx.room_id not in _rooms(ctx.config):
            return FilterResult.neutral()
        texts = renderings(ctx)
        if not texts:
            return FilterResult.neutral()
        results = await client.moderate(texts)
        if not any(r.flagged for r in results):
            return FilterResult.neutral()
        if any(SEXUAL_MINORS in r.categories for r in results):
            return FilterResult.prohibited(SPAM, CHILD_SAFETY_CSAM)
        return FilterResult.prohibited(SPAM)


# The allowed rooms as a set, per configuration object (the worker reuses one per
# community until it changes); bounded like the pipeline's own memo.
_ROOM_SETS: dict[int, tuple[EffectiveConfig, frozenset[str]]] = {}


def _rooms(config: EffectiveConfig) -> frozenset[str]:
    hit = _ROOM_SETS.get(id(config))
    if hit is not None and hit[0] is config:
        return hit[1]
    rooms = frozenset(config.get(ALLOWED_ROOM_IDS.name) or ())
    if len(_ROOM_SETS) >= 256:
        _ROOM_SETS.clear()
    _ROOM_SETS[id(config)] = (config, rooms)
    return rooms

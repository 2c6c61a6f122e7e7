"""Each filter on its own: a table of events and configurations → class and harms.

Boundaries follow policyserv's operators (≥ for counts of ats, mentions, trimmed bytes
and density; > for the JSON length and the frequency rate).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from tests.filters.filter_helpers import (
    ALICE,
    OWN_USER,
    config,
    context,
    event,
    message,
)
from warden.filters.base import DisplaynameCache, Filter, FilterContext, FilterDeps, Group
from warden.filters.density import DensityFilter
from warden.filters.event_type_prefilter import EventTypePrefilter
from warden.filters.keyword import KeywordFilter
from warden.filters.length import LengthFilter
from warden.filters.many_ats import ManyAtsFilter
from warden.filters.media import MediaFilter
from warden.filters.mentions import MentionsFilter
from warden.filters.protect_own_user import ProtectOwnUser
from warden.filters.registry import BY_NAME, FILTERS
from warden.filters.sender_prefilter import SenderPrefilter
from warden.filters.trim_length import TrimLengthFilter
from warden.filters.untrusted_media import UntrustedMediaFilter
from warden.matrix.canonical_json import encode_canonical_json
from warden.policy.config import known_keys
from warden.policy.harms import MEDIA, OTHER, SPAM, SPAM_FLOODING
from warden.policy.verdict import ContentClass
from warden.storage.displaynames import replace_displaynames

N = ContentClass.NEUTRAL
A = ContentClass.ALLOWED
P = ContentClass.PROHIBITED

Case = tuple[str, type[Filter], dict[str, Any], dict[str, Any], ContentClass, tuple[str, ...]]


def _sized_message(total_bytes: int) -> dict[str, Any]:
    """An m.room.message whose canonical JSON is exactly ``total_bytes`` long."""
    ev = message("")
    base = len(encode_canonical_json(ev))
    ev["content"]["body"] = "x" * (total_bytes - base)
    assert len(encode_canonical_json(ev)) == total_bytes
    return ev


def _body_with_spaces(length: int, spaces: int) -> str:
    return ("a " * spaces + "a" * (length - 2 * spaces)) if spaces else "a" * length


CASES: list[Case] = [
    # keyword: case-sensitive substring of the content JSON
    ("keyword hit", KeywordFilter, message("buy spam now"), {}, P, (SPAM,)),
    ("keyword case-sensitive", KeywordFilter, message("Spam"), {}, N, ()),
    ("keyword in a content key", KeywordFilter, event("x.y", {"spammy": 1}), {}, P, (SPAM,)),
    (
        "keyword only outside content",
        KeywordFilter,
        event(sender="@spam:example.org", content={"body": "hi"}),
        {},
        N,
        (),
    ),
    (
        "keyword full event",
        KeywordFilter,
        event(sender="@spam:example.org", content={"body": "hi"}),
        {"keyword_filter_use_full_event": True},
        P,
        (SPAM,),
    ),
    (
        "keyword custom list",
        KeywordFilter,
        message("zebra crossing"),
        {"keyword_filter_keywords": ["zebra"]},
        P,
        (SPAM,),
    ),
    (
        "keyword custom list miss",
        KeywordFilter,
        message("buy spam"),
        {"keyword_filter_keywords": ["zebra"]},
        N,
        (),
    ),
    # many ats: ≥ max, any event type
    ("20 ats", ManyAtsFilter, message("@" * 20), {}, P, (SPAM_FLOODING,)),
    ("19 ats", ManyAtsFilter, message("@" * 19), {}, N, ()),
    (
        "ats in state",
        ManyAtsFilter,
        event("m.room.topic", {"topic": "@" * 20}, state_key=""),
        {},
        P,
        (SPAM_FLOODING,),
    ),
    (
        "ats custom max",
        ManyAtsFilter,
        message("@@@"),
        {"many_ats_filter_max_ats": 3},
        P,
        (SPAM_FLOODING,),
    ),
    # length: > max bytes of the event JSON, m.room.message only
    ("length at max", LengthFilter, _sized_message(10000), {}, N, ()),
    ("length over max", LengthFilter, _sized_message(10001), {}, P, (SPAM_FLOODING,)),
    ("length other type", LengthFilter, event("m.sticker", {"body": "x" * 20000}), {}, N, ()),
    (
        "length custom",
        LengthFilter,
        _sized_message(501),
        {"length_filter_max_length": 500},
        P,
        (SPAM_FLOODING,),
    ),
    # trim length: ≥ max trimmed bytes
    ("trim 25", TrimLengthFilter, message(" " * 20 + "hi" + "\n" * 5), {}, P, (SPAM_FLOODING,)),
    ("trim 24", TrimLengthFilter, message(" " * 20 + "hi" + "\n" * 4), {}, N, ()),
    ("trim inner spaces", TrimLengthFilter, message("a" + " " * 40 + "b"), {}, N, ()),
    ("trim body not a string", TrimLengthFilter, message(42), {}, N, ()),
    ("trim other type", TrimLengthFilter, event("m.notice", {"body": " " * 40}), {}, N, ()),
    # density: bodies ≥ min bytes with density ≥ max
    ("dense 150", DensityFilter, message("a" * 150), {}, P, (SPAM_FLOODING,)),
    ("dense 149 below trigger", DensityFilter, message("a" * 149), {}, N, ()),
    (
        "density exactly max",
        DensityFilter,
        message(_body_with_spaces(200, 10)),
        {},
        P,
        (SPAM_FLOODING,),
    ),
    ("density just under max", DensityFilter, message(_body_with_spaces(200, 11)), {}, N, ()),
    (
        "density custom trigger",
        DensityFilter,
        message("a" * 10),
        {"density_filter_min_trigger_length": 10},
        P,
        (SPAM_FLOODING,),
    ),
    ("density other type", DensityFilter, event("m.notice", {"body": "a" * 300}), {}, N, ()),
    # media: event types and msgtypes
    ("sticker", MediaFilter, event("m.sticker", {"body": "s"}), {}, P, (SPAM, MEDIA)),
    ("image msgtype", MediaFilter, message("pic", "m.image"), {}, P, (SPAM, MEDIA)),
    ("text msgtype", MediaFilter, message("hi"), {}, N, ()),
    (
        "custom media list",
        MediaFilter,
        message("hi", "m.text"),
        {"media_filter_media_types": ["m.text"]},
        P,
        (SPAM, MEDIA),
    ),
    ("msgtype outside messages", MediaFilter, event("m.notice", {"msgtype": "m.image"}), {}, N, ()),
    # event type prefilter
    (
        "redaction allowed",
        EventTypePrefilter,
        event("m.room.redaction", {"redacts": "$x"}),
        {},
        A,
        (),
    ),
    (
        "state name allowed",
        EventTypePrefilter,
        event("m.room.name", {"name": "n"}, state_key=""),
        {},
        A,
        (),
    ),
    ("non-state name", EventTypePrefilter, event("m.room.name", {"name": "n"}), {}, N, ()),
    ("state redaction", EventTypePrefilter, event("m.room.redaction", {}, state_key=""), {}, N, ()),
    ("message not listed", EventTypePrefilter, message("hi"), {}, N, ()),
    # sender prefilter
    (
        "listed sender",
        SenderPrefilter,
        message("spam"),
        {"sender_prefilter_allowed_senders": [ALICE]},
        A,
        (),
    ),
    (
        "unlisted sender",
        SenderPrefilter,
        message("hi"),
        {"sender_prefilter_allowed_senders": ["@bob:example.org"]},
        N,
        (),
    ),
    # protecting our user
    (
        "kick of our user",
        ProtectOwnUser,
        event("m.room.member", {"membership": "leave"}, state_key=OWN_USER),
        {},
        P,
        (OTHER,),
    ),
    (
        "ban of our user",
        ProtectOwnUser,
        event("m.room.member", {"membership": "ban"}, state_key=OWN_USER),
        {},
        P,
        (OTHER,),
    ),
    (
        "our own leave",
        ProtectOwnUser,
        event("m.room.member", {"membership": "leave"}, state_key=OWN_USER, sender=OWN_USER),
        {},
        N,
        (),
    ),
    (
        "invite of our user",
        ProtectOwnUser,
        event("m.room.member", {"membership": "invite"}, state_key=OWN_USER),
        {},
        N,
        (),
    ),
    (
        "kick of someone else",
        ProtectOwnUser,
        event("m.room.member", {"membership": "leave"}, state_key="@bob:example.org"),
        {},
        N,
        (),
    ),
    (
        "our user on another server name",
        ProtectOwnUser,
        event("m.room.member", {"membership": "ban"}, state_key="@policyserv:elsewhere"),
        {},
        N,
        (),
    ),
]


@pytest.mark.parametrize(
    ("filter_cls", "ev", "overrides", "expected_class", "expected_harms"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_filter_table(
    deps: FilterDeps,
    filter_cls: type[Filter],
    ev: dict[str, Any],
    overrides: dict[str, Any],
    expected_class: ContentClass,
    expected_harms: tuple[str, ...],
) -> None:
    cfg = config(**overrides)
    assert filter_cls.enabled(cfg)
    result = await filter_cls().check(context(ev, deps, cfg))
    assert result.content_class is expected_class
    assert tuple(sorted(result.harms)) == expected_harms


DISABLED: list[tuple[type[Filter], dict[str, Any]]] = [
    (KeywordFilter, {"keyword_filter_keywords": []}),
    (KeywordFilter, {"keyword_filter_keywords": [""]}),
    (ManyAtsFilter, {"many_ats_filter_max_ats": 0}),
    (ManyAtsFilter, {"many_ats_filter_max_ats": -1}),
    (LengthFilter, {"length_filter_max_length": 0}),
    (TrimLengthFilter, {"trim_length_filter_max_difference": 0}),
    (DensityFilter, {"density_filter_max_density": 0.0}),
    (MediaFilter, {"media_filter_media_types": []}),
    (UntrustedMediaFilter, {"untrusted_media_filter_media_types": []}),
    (MentionsFilter, {"mention_filter_max_mentions": 0}),
    (SenderPrefilter, {}),  # empty allow list by default
    (
        EventTypePrefilter,
        {
            "event_type_prefilter_allowed_event_types": [],
            "event_type_prefilter_allowed_state_event_types": [],
        },
    ),
]


@pytest.mark.parametrize(("filter_cls", "overrides"), DISABLED)
def test_disabled_configs(filter_cls: type[Filter], overrides: dict[str, Any]) -> None:
    assert not filter_cls.enabled(config(**overrides))


def test_on_by_default_as_in_policyserv() -> None:
    cfg = config()
    on = {f.name for f in FILTERS if f.enabled(cfg)}
    assert on == {
        "protect_own_user",
        "event_type_prefilter",
        "moderation_prefilter",
        "unsafe_signing_key",
        "hellban_prefilter",
        "keyword",
        "mentions",
        "many_ats",
        "length",
        "trim_length",
        "density",
        "media",
        "untrusted_media",
        "inline_emoji_size",
        "hellban_postfilter",
    }  # sender prefilter (empty list), frequency, mention frequency, join and invite rates
    # (0), sticky events (allowed), link (no globs) and the user ID filters (max 0) are off


async def test_unset_is_not_false(deps: FilterDeps) -> None:
    """The instance turns full-event matching on; a community's explicit false wins,
    a community that says nothing inherits true. Lists replace, never merge."""
    env = {"PS_KEYWORD_FILTER_USE_FULL_EVENT": "true", "PS_MEDIA_FILTER_MEDIA_TYPES": "m.text"}
    ev = event(sender="@spam:example.org", content={"msgtype": "m.text", "body": "hi"})
    inherited = await KeywordFilter().check(context(ev, deps, config(env)))
    assert inherited.content_class is P
    overridden = config(env, keyword_filter_use_full_event=False)
    assert (await KeywordFilter().check(context(ev, deps, overridden))).content_class is N

    assert (await MediaFilter().check(context(ev, deps, config(env)))).content_class is P
    sticker = event("m.sticker", {})
    # The instance list replaced the default one: stickers are no longer media here.
    assert (await MediaFilter().check(context(sticker, deps, config(env)))).content_class is N
    assert not MediaFilter.enabled(config(env, media_filter_media_types=[]))


async def _learn(pool: asyncpg.Pool, names: dict[str, str]) -> str:
    room = f"!{uuid.uuid4().hex}:example.org"
    await replace_displaynames(pool, room, names)
    return room


async def test_mentions(deps: FilterDeps, pg_pool: asyncpg.Pool) -> None:
    members = {
        "@ann:example.org": "Annabelle",
        "@ben:example.org": "Benjamin",
        "@cat:example.org": "Catherine",
        "@dan:example.org": "Dan",  # shorter than the 5-byte minimum
        "@eve:example.org": "Annabelle",  # a duplicate name counts once
    }
    room = await _learn(pg_pool, members)
    cfg = config(mention_filter_max_mentions=3)

    async def judge(content: dict[str, Any], event_type: str = "m.room.message") -> Any:
        ev = event(event_type, {"msgtype": "m.text", **content}, room_id=room)
        return await MentionsFilter().check(context(ev, deps, cfg))

    three_ids = {"m.mentions": {"user_ids": list(members)[:3]}, "body": "hi"}
    assert (await judge(three_ids)).harms == (SPAM_FLOODING,)
    # Unknown users do not count: two learned + one stranger = 2 < 3.
    strangers = {
        "m.mentions": {"user_ids": [*list(members)[:2], "@zed:example.org"]},
        "body": "hi",
    }
    assert (await judge(strangers)).content_class is N
    # Plain-text display names (distinct, long enough).
    assert (await judge({"body": "Annabelle Benjamin Catherine"})).content_class is P
    assert (await judge({"body": "Annabelle Benjamin Dan"})).content_class is N
    # Duplicated names count once: two distinct names here.
    assert (await judge({"body": "Annabelle Annabelle Benjamin"})).content_class is N
    # User IDs in formatted_body count, added to m.mentions.
    mixed = {
        "m.mentions": {"user_ids": ["@ann:example.org"]},
        "body": "hey",
        "formatted_body": "<a>@ben:example.org</a> and @cat:example.org",
    }
    assert (await judge(mixed)).content_class is P
    # Only m.room.message is checked; malformed m.mentions is ignored.
    assert (await judge({"body": "Annabelle Benjamin Catherine"}, "m.notice")).content_class is N
    assert (await judge({"m.mentions": {"user_ids": "nope"}, "body": "x"})).content_class is N


async def test_mentions_display_names_are_cached_briefly(
    deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    room = await _learn(pg_pool, {"@a:x": "Aaaaaa"})
    assert await deps.displaynames.get(room) == {"@a:x": "Aaaaaa"}
    await replace_displaynames(pg_pool, room, {"@b:x": "Bbbbbb"})
    assert await deps.displaynames.get(room) == {"@a:x": "Aaaaaa"}  # served from memory
    fresh = FilterDeps(redis=deps.redis, pool=pg_pool, local_user_id=OWN_USER)
    assert await fresh.displaynames.get(room) == {"@b:x": "Bbbbbb"}


class CountingPool:
    """A real asyncpg pool that counts the ``fetch`` calls made through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.fetches = 0

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        self.fetches += 1
        return await self.pool.fetch(*args, **kwargs)


async def test_display_names_asked_for_at_once_are_read_once(
    pg_pool: asyncpg.Pool, pg_database: str
) -> None:
    """The events of a batch in a room whose names expired ask together: one read."""
    room = await _learn(pg_pool, {"@a:x": "Aaaaaa"})
    counting = CountingPool(pg_pool)
    cache = DisplaynameCache(counting, ttl_seconds=10)  # type: ignore[arg-type]
    got = await asyncio.gather(*(cache.get(room) for _ in range(50)))
    assert got == [{"@a:x": "Aaaaaa"}] * 50
    assert counting.fetches == 1
    assert await cache.get(room) == {"@a:x": "Aaaaaa"} and counting.fetches == 1  # memory

    # A waiter given up on (its filter timed out) leaves the read to the others.
    await replace_displaynames(pg_pool, room, {"@b:x": "Bbbbbb"})
    cache = DisplaynameCache(counting, ttl_seconds=10)  # type: ignore[arg-type]
    first, second = asyncio.create_task(cache.get(room)), asyncio.create_task(cache.get(room))
    await asyncio.sleep(0)  # both are waiting on the one read
    first.cancel()
    assert await second == {"@b:x": "Bbbbbb"}
    assert first.cancelled() and counting.fetches == 2

    # A failed read fails every waiter, and the next ask reads again.
    closed = await asyncpg.create_pool(pg_database, min_size=1, max_size=1)
    await closed.close()
    cache = DisplaynameCache(closed, ttl_seconds=10)
    failed = await asyncio.gather(cache.get(room), cache.get(room), return_exceptions=True)
    assert all(isinstance(f, asyncpg.InterfaceError) for f in failed), failed
    assert cache.reads == 1
    with pytest.raises(asyncpg.InterfaceError):
        await cache.get(room)
    assert cache.reads == 2


async def test_mentions_waits_on_io_only_for_a_room_not_in_memory(
    deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    """The pipeline gives the mentions filter a timer (and maybe a task) only when the
    room's display names must be read from PostgreSQL; a message of a room in memory, or
    another event type, is counted in the evaluation's own task."""
    room = await _learn(pg_pool, {"@a:x": "Aaaaaa"})
    flt = MentionsFilter()

    def ctx(event_type: str) -> FilterContext:
        event = {"type": event_type, "room_id": room, "sender": "@s:x", "content": {}}
        return FilterContext(
            event=event, event_id="$e", room_id=room, community_id="c", config=config(), deps=deps
        )

    assert not MentionsFilter.waits_on_io and MentionsFilter.waits_on_io_sometimes
    assert flt.waits_for(ctx("m.room.message"))  # not read yet
    assert not flt.waits_for(ctx("m.room.member"))
    assert not deps.displaynames.fresh(room)
    await deps.displaynames.get(room)
    assert deps.displaynames.fresh(room)
    assert not flt.waits_for(ctx("m.room.message"))


def test_every_filter_declares_its_plugin_metadata() -> None:
    keys = known_keys()
    assert len(BY_NAME) == len(FILTERS)
    groups = [f.group for f in FILTERS]
    assert groups == sorted(groups)
    for f in FILTERS:
        assert f.name and isinstance(f.group, Group)
        key = keys[f"{f.name}_fail_secure"]
        assert key.type == "bool" and key.default is True
    # policyserv's keys and defaults.
    expected = {
        "keyword_filter_keywords": ["spammy", "spam"],
        "keyword_filter_use_full_event": False,
        "mention_filter_max_mentions": 20,
        "mention_filter_min_plaintext_length": 5,
        "many_ats_filter_max_ats": 20,
        "length_filter_max_length": 10000,
        "trim_length_filter_max_difference": 25,
        "density_filter_max_density": 0.95,
        "density_filter_min_trigger_length": 150,
        "media_filter_media_types": ["m.sticker", "m.image", "m.video", "m.file", "m.audio"],
        "event_type_prefilter_allowed_event_types": ["m.room.redaction"],
        "sender_prefilter_allowed_senders": [],
        "hellban_postfilter_minutes": 60,
        "frequency_filter_event_types": ["m.room.message", "m.sticker", "m.reaction"],
        "frequency_filter_rate_limit": 0.0,
    }
    for name, default in expected.items():
        assert keys[name].default == default, name
    assert "m.room.server_acl" in keys["event_type_prefilter_allowed_state_event_types"].default

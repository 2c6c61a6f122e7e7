"""The untrusted-media filter and its trust sources: community globs (deny wins), the
Muninn Hall directory, v12 creators and power levels from Warden's learned room state."""

from __future__ import annotations

import uuid
from typing import Any, cast

import asyncpg
import pytest

from tests.filters.filter_helpers import config, context, event
from warden.filters.base import FilterDeps
from warden.filters.untrusted_media import UntrustedMediaFilter
from warden.policy.config import EffectiveConfig
from warden.policy.harms import MEDIA, SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage import room_state
from warden.trust import muninn

P = ContentClass.PROHIBITED
CREATOR = "@creator:example.org"
CO_CREATOR = "@co:example.org"
MOD = "@mod:example.org"
HELPER = "@helper:example.org"  # power level 49, under state_default
NEWCOMER = "@new:example.org"
_depth = iter(range(1, 10**6))


def new_room() -> str:
    return f"!{uuid.uuid4().hex}:example.org"


def state(room: str, event_type: str, content: dict[str, Any], sender: str) -> dict[str, Any]:
    ev = event(event_type, content, sender=sender, room_id=room, state_key="")
    ev["depth"] = next(_depth)
    return ev


async def seed(pool: asyncpg.Pool, room: str, version: str) -> None:
    """A room whose learned state has a create event by CREATOR (v12: with CO_CREATOR
    as additional creator) and power levels MOD 50, HELPER 49, state_default 50."""
    create: dict[str, Any] = {"room_version": version}
    if version == "12":
        create["additional_creators"] = [CO_CREATOR]
    users = {MOD: 50, HELPER: 49}
    events = [
        state(room, "m.room.create", create, CREATOR),
        state(room, "m.room.power_levels", {"users": users, "state_default": 50}, CREATOR),
    ]
    await room_state.seed_from_state(pool, room, version, events)


def image(sender: str, room: str) -> dict[str, Any]:
    return event(
        "m.room.message",
        {"msgtype": "m.image", "body": "a.png", "url": "mxc://x/y"},
        sender=sender,
        room_id=room,
    )


def meant(**overrides: Any) -> EffectiveConfig:
    """What communities mean by "trusted users may post media": the plain media filter
    off (policyserv issue #94), hellbans off so one refusal does not colour the next."""
    return config(media_filter_media_types=[], hellban_postfilter_minutes=0, **overrides)


async def judge(
    deps: FilterDeps,
    ev: dict[str, Any],
    cfg: EffectiveConfig,
    *,
    version: str = "12",
    verified: bool = True,
) -> Verdict:
    return await Pipeline(deps, timeout_seconds=5).evaluate(
        ev,
        event_id=f"${uuid.uuid4().hex}",
        community_id="default",
        config=cfg,
        sender_verified=verified,
        room_version=version,
    )


def refused_by(v: Verdict) -> set[str]:
    return {f.name for f in v.filters if f.content_class is P}


async def test_an_untrusted_senders_media_is_refused_their_text_is_not(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await seed(pg_pool, room, "12")
    v = await judge(deps, image(NEWCOMER, room), meant())
    assert v.content_class is P and refused_by(v) == {"untrusted_media"}
    assert {SPAM, MEDIA} <= set(v.harms)
    sticker = event("m.sticker", {"body": "s", "url": "mxc://x/s"}, sender=NEWCOMER, room_id=room)
    assert refused_by(await judge(deps, sticker, meant())) == {"untrusted_media"}
    text = event("m.room.message", {"msgtype": "m.text", "body": "hi"}, sender=NEWCOMER)
    text["room_id"] = room
    assert (await judge(deps, text, meant())).content_class is not P


async def test_creators_of_a_v12_room_are_trusted_from_learned_state(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await seed(pg_pool, room, "12")
    for user in (CREATOR, CO_CREATOR):
        assert refused_by(await judge(deps, image(user, room), meant())) == set(), user
    # Before v12 the create event's sender has no special standing (and no power
    # level entry in this room).
    old = new_room()
    await seed(pg_pool, old, "10")
    assert refused_by(await judge(deps, image(CREATOR, old), meant(), version="10")) == {
        "untrusted_media"
    }


async def test_power_levels_at_least_state_default_are_trusted(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await seed(pg_pool, room, "10")
    assert refused_by(await judge(deps, image(MOD, room), meant(), version="10")) == set()
    assert refused_by(await judge(deps, image(HELPER, room), meant(), version="10")) == {
        "untrusted_media"
    }
    # users_default counts for users without an entry.
    generous = new_room()
    await room_state.seed_from_state(
        pg_pool,
        generous,
        "10",
        [
            state(generous, "m.room.create", {"room_version": "10"}, CREATOR),
            state(generous, "m.room.power_levels", {"users_default": 50}, CREATOR),
        ],
    )
    assert refused_by(await judge(deps, image(NEWCOMER, generous), meant(), version="10")) == set()
    # The switch turns both room-derived sources off.
    off = meant(untrusted_media_filter_use_power_levels=False)
    assert refused_by(await judge(deps, image(MOD, room), off, version="10")) == {"untrusted_media"}
    v12 = new_room()
    await seed(pg_pool, v12, "12")
    assert refused_by(await judge(deps, image(CREATOR, v12), off)) == {"untrusted_media"}


async def test_a_room_without_learned_state_trusts_nobody_by_room(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    # What the event or anyone says of the room counts for nothing: only learned state.
    unknown = new_room()
    assert refused_by(await judge(deps, image(MOD, unknown), meant())) == {"untrusted_media"}


async def test_allowed_globs_trust_and_a_denied_glob_wins_over_every_source(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await seed(pg_pool, room, "12")
    allowed = meant(untrusted_media_filter_allowed_user_globs=["@new:*"])
    assert refused_by(await judge(deps, image(NEWCOMER, room), allowed)) == set()
    # Deny wins over the allow list, a creator's standing and a moderator's level.
    server = f"{uuid.uuid4().hex}.example"
    await muninn.store_servers(pg_pool, [server], source="test")
    denied = meant(
        untrusted_media_filter_allowed_user_globs=["*"],
        untrusted_media_filter_denied_user_globs=["@new:*", "@creator:*", "@mod:*", "*:" + server],
    )
    for user in (NEWCOMER, CREATOR, MOD, f"@member:{server}"):
        assert refused_by(await judge(deps, image(user, room), denied)) == {"untrusted_media"}
    # Globs are policyserv's: * is the only wildcard, ? is literal.
    literal = meant(untrusted_media_filter_allowed_user_globs=["@ne?:example.org"])
    assert refused_by(await judge(deps, image(NEWCOMER, room), literal)) == {"untrusted_media"}


async def test_muninn_hall_members_servers_are_trusted(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await seed(pg_pool, room, "12")
    server = f"{uuid.uuid4().hex}.example"
    await muninn.store_servers(pg_pool, [server, "other.example"], source="test")
    deps.muninn.invalidate()
    member = f"@someone:{server}"
    assert refused_by(await judge(deps, image(member, room), meant())) == set()
    off = meant(untrusted_media_filter_use_muninn=False)
    assert refused_by(await judge(deps, image(member, room), off)) == {"untrusted_media"}
    # A server whose name merely ends like a member's is not one.
    assert refused_by(await judge(deps, image(f"@x:evil{server}", room), meant())) == {
        "untrusted_media"
    }


async def test_an_unproven_sender_is_trusted_by_no_source(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await seed(pg_pool, room, "12")
    cfg = meant(untrusted_media_filter_allowed_user_globs=["*"])
    v = await judge(deps, image(CREATOR, room), cfg, verified=False)
    assert refused_by(v) == {"untrusted_media"}


async def test_the_plain_media_filter_on_by_default_still_refuses_trusted_media(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    """policyserv issue #94, kept for parity and documented: a trust grant does nothing
    while media_filter_media_types lists the type."""
    room = new_room()
    await seed(pg_pool, room, "12")
    cfg = config(hellban_postfilter_minutes=0)
    assert refused_by(await judge(deps, image(CREATOR, room), cfg)) == {"media"}
    assert refused_by(await judge(deps, image(NEWCOMER, room), cfg)) == {
        "media",
        "untrusted_media",
    }


@pytest.mark.parametrize(
    "ev",
    [
        event("m.room.message", {"msgtype": "m.text", "body": "hi"}),
        event("m.reaction", {"m.relates_to": {"key": "x"}}),
        image(NEWCOMER, "!r:example.org"),
    ],
)
async def test_no_trust_lookup_unless_a_media_event_needs_one(ev: dict[str, Any]) -> None:
    """Text needs no lookup at all, nor does media the globs decide: with no store at
    all (no pool) nothing fails."""
    import redis.asyncio as aioredis

    bare = FilterDeps(
        redis=aioredis.Redis(), pool=cast(asyncpg.Pool, None), local_user_id="@p:example.org"
    )
    cfg = meant(untrusted_media_filter_allowed_user_globs=["@new:*"])
    result = await UntrustedMediaFilter().check(context(ev, bare, cfg))
    assert result.content_class is ContentClass.NEUTRAL
    # Sources switched off are not looked up either: refused without any store.
    if ev["content"].get("msgtype") == "m.image":
        no_sources = meant(
            untrusted_media_filter_use_muninn=False, untrusted_media_filter_use_power_levels=False
        )
        result = await UntrustedMediaFilter().check(context(ev, bare, no_sources))
        assert result.content_class is P

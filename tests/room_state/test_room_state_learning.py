"""Learned room state in PostgreSQL (``warden.storage.room_state``) and the policy list
filter that reads it, against the real database."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.filters.filter_helpers import config
from warden.filters import policy_list
from warden.filters.base import FilterDeps
from warden.policy.pipeline import Pipeline
from warden.storage import room_state
from warden.storage.displaynames import get_displaynames
from warden.storage.rooms import put_room

OUR_SERVER = "warden.test"
OUR_USER = f"@policyserv:{OUR_SERVER}"
OUR_KEY = "A" * 43


def room() -> str:
    return f"!{uuid.uuid4().hex}:example.org"


_depth = iter(range(1, 10**6))


def state(
    event_type: str,
    state_key: str,
    content: dict[str, Any],
    *,
    sender: str = "@mod:example.org",
    depth: int | None = None,
) -> dict[str, Any]:
    """A state event (v11 shape; event IDs are reference hashes)."""
    return {
        "type": event_type,
        "state_key": state_key,
        "sender": sender,
        "room_id": "!ignored:example.org",
        "content": content,
        "origin_server_ts": 1,
        "depth": depth if depth is not None else next(_depth),
        "auth_events": [],
        "prev_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }


async def apply(pool: asyncpg.Pool, room_id: str, ev: dict[str, Any]) -> Any:
    return await room_state.apply_event(
        pool, room_id, ev, f"${uuid.uuid4().hex}", our_user_id=OUR_USER
    )


async def test_events_update_members_power_levels_creators_acl_and_policy(
    pg_pool: asyncpg.Pool,
) -> None:
    r = room()
    await put_room(pg_pool, r, "12", "default")
    member = "m.room.member"
    await apply(pg_pool, r, state(member, "@a:x.org", {"membership": "join", "displayname": "Ann"}))
    await apply(pg_pool, r, state(member, "@b:x.org", {"membership": "join"}))
    await apply(pg_pool, r, state(member, "@c:x.org", {"membership": "join", "displayname": "C"}))
    await apply(pg_pool, r, state(member, "@c:x.org", {"membership": "ban"}))
    assert await get_displaynames(pg_pool, r) == {"@a:x.org": "Ann", "@b:x.org": ""}

    create = state(
        "m.room.create",
        "",
        {"room_version": "12", "additional_creators": ["@co:y.org"]},
        sender="@founder:x.org",
    )
    update = await apply(pg_pool, r, create)
    assert update.kind == "create"
    assert await room_state.get_creators(pg_pool, r, "12") == ["@founder:x.org", "@co:y.org"]
    assert await room_state.get_creators(pg_pool, r, "11") == []  # no privileged creators

    await apply(pg_pool, r, state("m.room.power_levels", "", {"users": {"@a:x.org": 50}}))
    assert await room_state.get_power_levels(pg_pool, r) == {"users": {"@a:x.org": 50}}
    await apply(pg_pool, r, state("m.room.server_acl", "", {"deny": ["evil.org"], "allow": ["*"]}))
    assert (await room_state.get_server_acl(pg_pool, r)) == {"deny": ["evil.org"], "allow": ["*"]}

    unknown = await room_state.get_policy_server(pg_pool, r, OUR_SERVER, OUR_KEY)
    assert unknown.to_api() == {
        "uses_warden": False,
        "via": None,
        "public_key": None,
        "key_matches": False,
    }
    policy = {"via": OUR_SERVER, "public_keys": {"ed25519": OUR_KEY}}
    await apply(pg_pool, r, state("m.room.policy", "", policy))
    ps = await room_state.get_policy_server(pg_pool, r, OUR_SERVER, OUR_KEY)
    assert (ps.uses_warden, ps.key_matches, ps.via, ps.public_key) == (
        True,
        True,
        OUR_SERVER,
        OUR_KEY,
    )
    assert not (await room_state.get_policy_server(pg_pool, r, OUR_SERVER, "B" * 43)).key_matches
    await apply(pg_pool, r, state("m.room.policy", "", {"via": "other.org", "public_keys": {}}))
    ps = await room_state.get_policy_server(pg_pool, r, OUR_SERVER, OUR_KEY)
    assert (ps.uses_warden, ps.via, ps.public_key) == (False, "other.org", None)
    # Non-empty state keys of single-entry types are not the room's state.
    assert await apply(pg_pool, r, state("m.room.policy", "x", policy)) is None
    # learning bumped the admin API's last_cached_state_timestamp
    assert await pg_pool.fetchval("SELECT last_state_update_ts FROM rooms WHERE room_id = $1", r)


async def test_depth_orders_one_servers_events_but_never_pins_an_entry(
    pg_pool: asyncpg.Pool,
) -> None:
    r = room()
    pl = "m.room.power_levels"
    # One server's older event, delivered late, does not replace its newer one.
    await apply(pg_pool, r, state(pl, "", {"ban": 90}, depth=20))
    late = await apply(pg_pool, r, state(pl, "", {"ban": 10}, depth=5))
    assert late is not None and late.kind == "stale" and not late.changed
    assert await room_state.get_power_levels(pg_pool, r) == {"ban": 90}
    await apply(pg_pool, r, state(pl, "", {"ban": 70}, depth=21))
    assert await room_state.get_power_levels(pg_pool, r) == {"ban": 70}
    # A huge depth does not pin an entry: another server's later change replaces it.
    await apply(pg_pool, r, state(pl, "", {"ban": 1}, sender="@evil:evil.org", depth=2**53 - 1))
    assert await room_state.get_power_levels(pg_pool, r) == {"ban": 1}
    await apply(pg_pool, r, state(pl, "", {"ban": 50}, depth=22))
    assert await room_state.get_power_levels(pg_pool, r) == {"ban": 50}
    # Nothing older than the last verified snapshot's deepest state event is learned
    # (a replayed old event), whoever sent it.
    await room_state.seed_from_state(pg_pool, r, "11", [state(pl, "", {"ban": 60}, depth=100)])
    replay = await apply(pg_pool, r, state(pl, "", {"ban": 5}, sender="@x:y.org", depth=99))
    assert replay is not None and replay.kind == "stale"
    assert await room_state.get_power_levels(pg_pool, r) == {"ban": 60}
    member = "m.room.member"
    await apply(pg_pool, r, state(member, "@m:y.org", {"membership": "join"}, depth=101))
    old_ban = state(member, "@m:y.org", {"membership": "ban"}, depth=100)
    assert (await apply(pg_pool, r, old_ban)).kind == "stale"  # same server, older
    assert "@m:y.org" in await get_displaynames(pg_pool, r)


async def test_policy_rules_are_learned_replaced_and_removed(pg_pool: asyncpg.Pool) -> None:
    lst = room()
    ban = {"recommendation": "m.ban", "reason": "spam"}
    await apply(pg_pool, lst, state("m.policy.rule.user", "r1", {"entity": "@spam*:x.org", **ban}))
    await apply(pg_pool, lst, state("m.policy.rule.server", "r2", {"entity": "evil.*", **ban}))
    await apply(pg_pool, lst, state("m.policy.rule.room", "r3", {"entity": "!r:x.org", **ban}))
    await apply(
        pg_pool,
        lst,
        state(
            "org.matrix.mjolnir.rule.user",
            "r4",
            {"entity": "@legacy:x.org", "recommendation": "org.matrix.mjolnir.ban"},
        ),
    )
    await apply(
        pg_pool,
        lst,
        state("m.policy.rule.user", "r5", {"entity": "@fine:x.org", "recommendation": "m.mute"}),
    )  # not a ban
    rules = await room_state.get_policy_rules(pg_pool, [lst])
    assert sorted((x.kind, x.entity) for x in rules) == [
        ("room", "!r:x.org"),
        ("server", "evil.*"),
        ("user", "@legacy:x.org"),
        ("user", "@spam*:x.org"),
    ]
    # An emptied rule is gone, and an older copy delivered late does not bring it back.
    emptied = state("m.policy.rule.user", "r1", {})
    await apply(pg_pool, lst, emptied)
    stale = state("m.policy.rule.user", "r1", {"entity": "@spam*:x.org", **ban}, depth=1)
    await apply(pg_pool, lst, stale)
    rules = await room_state.get_policy_rules(pg_pool, [lst])
    assert "@spam*:x.org" not in {x.entity for x in rules}
    assert await room_state.get_policy_rules(pg_pool, [room()]) == []


async def test_wardens_removal_is_recorded_and_a_seed_replaces_everything(
    pg_pool: asyncpg.Pool,
) -> None:
    r = room()
    await put_room(pg_pool, r, "11", "default")
    await pg_pool.execute(
        """INSERT INTO room_memberships (room_id, membership, room_version, event_id, updated_ts)
           VALUES ($1, 'join', '11', '$j', 1)""",
        r,
    )
    await apply(
        pg_pool, r, state("m.room.member", OUR_USER, {"membership": "join"}, sender=OUR_USER)
    )
    update = await apply(
        pg_pool, r, state("m.room.member", OUR_USER, {"membership": "ban"}, sender="@mod:x.org")
    )
    assert update.own_membership == "ban"
    st = await room_state.get_membership_state(pg_pool, r)
    assert st is not None and (st.membership, st.removed_by) == ("ban", "@mod:x.org")
    assert (
        await pg_pool.fetchval("SELECT membership FROM room_memberships WHERE room_id = $1", r)
        == "leave"
    )
    assert r not in {t.room_id for t in await room_state.rooms_to_refresh(pg_pool)}

    # A join's send_join state (Warden is back) replaces what was learned.
    await apply(pg_pool, r, state("m.room.member", "@gone:x.org", {"membership": "join"}))
    await apply(pg_pool, r, state("m.room.power_levels", "", {"ban": 1}))
    snapshot = [
        state("m.room.create", "", {"room_version": "11"}, sender="@founder:x.org"),
        state("m.room.member", "@new:x.org", {"membership": "join", "displayname": "New"}),
        state("m.room.member", OUR_USER, {"membership": "join"}, sender=OUR_USER),
        state("m.room.policy", "", {"via": OUR_SERVER, "public_keys": {"ed25519": OUR_KEY}}),
        state("m.room.avatar", "", {"url": "mxc://x.org/ignored"}),
        # Kept since user_may_publish_room judges it (issue 14).
        state("m.room.topic", "", {"topic": "Gardens"}),
        {"not": "an event"},
    ]
    kept = await room_state.seed_from_state(
        pg_pool, r, "11", snapshot, our_user_id=OUR_USER, event_id="$anchor"
    )
    assert kept == 5  # create, policy, topic, two members
    assert await room_state.get_name_and_topic(pg_pool, r) == ("", "Gardens")
    assert await get_displaynames(pg_pool, r) == {"@new:x.org": "New", OUR_USER: ""}
    assert await room_state.get_power_levels(pg_pool, r) is None
    assert (await room_state.get_policy_server(pg_pool, r, OUR_SERVER, OUR_KEY)).key_matches
    st = await room_state.get_membership_state(pg_pool, r)
    assert st is not None and (st.membership, st.removed_by, st.last_event_id) == (
        "join",
        None,
        "$anchor",
    )
    targets = {t.room_id: t for t in await room_state.rooms_to_refresh(pg_pool)}
    assert targets[r].last_event_id == "$anchor"


@pytest.fixture
def deps(redis_client: aioredis.Redis, pg_pool: asyncpg.Pool) -> FilterDeps:
    return FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OUR_USER)


async def test_policy_list_filter_bans_users_and_servers_for_every_event_type(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    policy_list.clear_rule_cache()
    lst = room()
    ban = {"recommendation": "m.ban"}
    await apply(pg_pool, lst, state("m.policy.rule.user", "u", {"entity": "@spam?:x.org", **ban}))
    await apply(pg_pool, lst, state("m.policy.rule.server", "s", {"entity": "*.EVIL.org", **ban}))
    await apply(pg_pool, lst, state("m.policy.rule.room", "r", {"entity": "*", **ban}))
    pipeline = Pipeline(deps, timeout_seconds=5)
    protected = config(policy_list_room_ids=[lst], media_filter_media_types=[])
    other_community = config(media_filter_media_types=[])

    async def verdict(
        sender: str,
        event_type: str = "m.room.message",
        cfg: Any = protected,
        state_key: str | None = None,
        content: dict[str, Any] | None = None,
        community: str = "c",
    ) -> Any:
        ev: dict[str, Any] = {
            "type": event_type,
            "sender": sender,
            "room_id": room(),
            "content": content if content is not None else {"body": "hi", "msgtype": "m.text"},
        }
        if state_key is not None:
            ev["state_key"] = state_key
        return await pipeline.evaluate(
            ev, event_id=f"${uuid.uuid4().hex}", community_id=community, config=cfg
        )

    banned = await verdict("@spam1:x.org")
    assert banned.prohibited and "org.matrix.msc4456.other" in banned.harms
    assert any(
        f.name == "policy_list" and f.content_class.label == "prohibited" for f in banned.filters
    )
    assert not (await verdict("@spam12:x.org")).prohibited  # ? is one character
    assert (await verdict("@anyone:a.evil.org")).prohibited  # server glob, any case
    assert not (await verdict("@anyone:evil.org")).prohibited
    # Every event type: reactions, and state events the type prefilter allows.
    assert (await verdict("@spam1:x.org", "m.reaction", content={})).prohibited
    assert (
        await verdict("@spam1:x.org", "m.room.name", state_key="", content={"name": "x"})
    ).prohibited
    # A banned user leaving is let through (one not hellbanned by a refusal above);
    # room rules never match senders.
    assert not (
        await verdict(
            "@spam2:x.org",
            "m.room.member",
            state_key="@spam2:x.org",
            content={"membership": "leave"},
        )
    ).prohibited
    assert not (await verdict("@ok:x.org")).prohibited
    # A community that names no list, or switched the filter off, is unaffected.
    assert not (await verdict("@spam1:x.org", cfg=other_community, community="other")).prohibited
    off = config(
        policy_list_room_ids=[lst], mjolnir_filter_enabled=False, media_filter_media_types=[]
    )
    assert not (await verdict("@spam1:x.org", cfg=off, community="off")).prohibited


def _rejected(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("warden_policy_rules_rejected_total", {"reason": reason}) or 0.0
    )


async def test_rule_entities_over_the_caps_are_dropped_and_counted(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    policy_list.clear_rule_cache()
    lst = room()
    ban = {"recommendation": "m.ban"}
    too_long, too_wild = _rejected("entity_too_long"), _rejected("too_many_wildcards")
    # Valid for a moment, then replaced by an over-long rule at the same state key: the
    # replacement holds the state key, so the older rule is gone too.
    await apply(pg_pool, lst, state("m.policy.rule.user", "a", {"entity": "@x*:x.org", **ban}))
    long_entity = "@" + "a" * 300 + "*:x.org"
    await apply(pg_pool, lst, state("m.policy.rule.user", "a", {"entity": long_entity, **ban}))
    wild = "@" + "?*" * 40 + ":x.org"
    await apply(pg_pool, lst, state("m.policy.rule.user", "b", {"entity": wild, **ban}))
    # The review's glob is fine once its stars are collapsed: learned, and cheap to match.
    review = "*" * 28 + "§"
    await apply(pg_pool, lst, state("m.policy.rule.user", "c", {"entity": review, **ban}))
    seeded = room()
    await room_state.seed_from_state(
        pg_pool,
        seeded,
        "11",
        [state("m.policy.rule.server", "d", {"entity": "x" * 256, **ban})],
        our_user_id=OUR_USER,
    )
    assert _rejected("entity_too_long") == too_long + 2
    assert _rejected("too_many_wildcards") == too_wild + 1
    rules = await room_state.get_policy_rules(pg_pool, [lst, seeded])
    assert [r.entity for r in rules] == [review]

    pipeline = Pipeline(deps, timeout_seconds=5)
    cfg = config(policy_list_room_ids=[lst, seeded], media_filter_media_types=[])
    event = {
        "type": "m.room.message",
        "sender": "@alice:example.org",
        "room_id": room(),
        "content": {"body": "hi", "msgtype": "m.text"},
    }
    verdict = await pipeline.evaluate(
        event, event_id=f"${uuid.uuid4().hex}", community_id="caps", config=cfg
    )
    assert not verdict.prohibited
    event["sender"] = "@alice§:example.org§"
    verdict = await pipeline.evaluate(
        event, event_id=f"${uuid.uuid4().hex}", community_id="caps", config=cfg
    )
    assert verdict.prohibited


async def test_a_seed_keeps_member_state_keys_that_are_user_ids_within_the_caps(
    pg_pool: asyncpg.Pool,
) -> None:
    r = room()
    member = "m.room.member"
    rule = {"recommendation": "m.ban"}
    snapshot = [
        state(member, "e", {"membership": "join"}),  # not a user ID
        *(state(member, f"@u{i}:x.org", {"membership": "join"}) for i in range(4)),
        state(member, "@banned:x.org", {"membership": "ban"}),
        *(state("m.policy.rule.user", f"r{i}", {"entity": f"@s{i}:x", **rule}) for i in range(3)),
    ]
    caps = room_state.StateCaps(members=4, displaynames=3, policy_rules=2)
    await room_state.seed_from_state(pg_pool, r, "11", snapshot, caps=caps)
    assert sorted(await get_displaynames(pg_pool, r)) == ["@u0:x.org", "@u1:x.org", "@u2:x.org"]
    rows = await pg_pool.fetch("SELECT user_id FROM room_members WHERE room_id = $1", r)
    assert len(rows) == 4 and "e" not in {x["user_id"] for x in rows}
    assert len(await room_state.get_policy_rules(pg_pool, [r])) == 2
    counts = await pg_pool.fetchrow(
        "SELECT member_count, displayname_count, rule_count FROM room_state WHERE room_id = $1", r
    )
    assert tuple(counts) == (4, 3, 2)

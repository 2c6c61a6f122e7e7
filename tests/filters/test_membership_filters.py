"""Membership events at /sign (issue 11): join and invite rates in Redis shared by
workers, policy-list bans of joins and invites, and moderation that content filters
never refuse. Real Redis and PostgreSQL; the shared join window across two processes."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.conftest import REDIS_URL
from tests.filters.filter_helpers import OWN_USER, config, event, new_event_id
from warden import redis_keys
from warden.filters import policy_list
from warden.filters.base import FilterDeps
from warden.policy.config import EffectiveConfig
from warden.policy.harms import OTHER, SPAM, SPAM_FLOODING
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage import room_state

P = ContentClass.PROHIBITED
N = ContentClass.NEUTRAL
A = ContentClass.ALLOWED
WORKTREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def new_room() -> str:
    return f"!{uuid.uuid4().hex}:example.org"


def member(sender: str, target: str, membership: str, room: str, **content: Any) -> dict[str, Any]:
    return event(
        "m.room.member",
        {"membership": membership, **content},
        sender=sender,
        room_id=room,
        state_key=target,
    )


def pipeline(deps: FilterDeps) -> Pipeline:
    return Pipeline(deps, timeout_seconds=5)


async def judge(
    p: Pipeline,
    ev: dict[str, Any],
    cfg: EffectiveConfig,
    *,
    event_id: str | None = None,
    community: str = "default",
    now: int | None = None,
    verified: bool = True,
    room_version: str = "10",
) -> Verdict:
    return await p.evaluate(
        ev,
        event_id=event_id or new_event_id(),
        community_id=community,
        config=cfg,
        first_seen_ts=now,
        sender_verified=verified,
        room_version=room_version,
    )


def refused_by(v: Verdict) -> set[str]:
    return {f.name for f in v.filters if f.content_class is P}


# --- join rate -----------------------------------------------------------------------


async def test_join_rate_refuses_past_the_limit_per_room_counting_event_ids_once(
    redis_client: aioredis.Redis, deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    p = pipeline(deps)
    cfg = config(join_rate_filter_max_joins_per_minute=3, hellban_postfilter_minutes=0)
    room, other_room = new_room(), new_room()
    key = redis_keys.join_rate(room)
    t0 = 50_000_000

    first = new_event_id()
    for _ in range(3):  # the same join judged again counts once
        assert (
            await judge(
                p, member("@u1:x.org", "@u1:x.org", "join", room), cfg, event_id=first, now=t0
            )
        ).content_class is N
    assert await redis_client.zcard(key) == 1
    for i in (2, 3):  # 3 joins in the minute: exactly the limit
        v = await judge(p, member(f"@u{i}:x.org", f"@u{i}:x.org", "join", room), cfg, now=t0 + i)
        assert v.content_class is N
    fourth = await judge(p, member("@u4:x.org", "@u4:x.org", "join", room), cfg, now=t0 + 10)
    assert fourth.content_class is P and fourth.harms == (SPAM_FLOODING,)
    assert refused_by(fourth) == {"join_rate"}
    assert await redis_client.zcard(key) == 4
    assert 0 < await redis_client.pttl(key) <= 120_000

    # Another room has its own window; leaves and messages are not joins.
    assert (
        await judge(p, member("@u5:x.org", "@u5:x.org", "join", other_room), cfg, now=t0 + 11)
    ).content_class is N
    assert (
        await judge(p, member("@u1:x.org", "@u1:x.org", "leave", room), cfg, now=t0 + 12)
    ).content_class is N
    # A join whose sender is not proven is measured but not counted.
    unproven = await judge(
        p, member("@u6:x.org", "@u6:x.org", "join", room), cfg, now=t0 + 13, verified=False
    )
    assert unproven.content_class is P
    assert await redis_client.zcard(key) == 4

    # The window slides: a minute after the burst a join passes again.
    later = await judge(p, member("@u7:x.org", "@u7:x.org", "join", room), cfg, now=t0 + 60_011)
    assert later.content_class is N
    assert await redis_client.zcard(key) == 1

    # Off by default and at 0.
    assert "join_rate" not in {
        f.name
        for f in (await judge(p, member("@u8:x.org", "@u8:x.org", "join", room), config())).filters
    }


async def test_join_rate_does_not_count_profile_changes_of_learned_members(
    redis_client: aioredis.Redis, deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    room = new_room()
    await room_state.seed_from_state(
        pg_pool, room, "10", moderation_room_state(room, {"@member:x.org": 0})
    )
    p = pipeline(deps)
    cfg = config(join_rate_filter_max_joins_per_minute=1, hellban_postfilter_minutes=0)
    for name in ("a", "b", "c"):  # a joined member changing display name thrice
        rename = member("@member:x.org", "@member:x.org", "join", room, displayname=name)
        assert (await judge(p, rename, cfg)).content_class is N
    assert await redis_client.zcard(redis_keys.join_rate(room)) == 0

    # A join learned from /send before it is judged is still a join (its own event set
    # the learned membership).
    fresh = state_event("m.room.member", "@fresh:x.org", {"membership": "join"}, "@fresh:x.org")
    fresh["room_id"] = room
    fresh_id = new_event_id()
    await room_state.apply_event(pg_pool, room, fresh, fresh_id)
    assert (await judge(p, fresh, cfg, event_id=fresh_id)).content_class is N
    assert await redis_client.zcard(redis_keys.join_rate(room)) == 1
    late = await judge(p, member("@new:x.org", "@new:x.org", "join", room), cfg)
    assert late.content_class is P and refused_by(late) == {"join_rate"}


async def _start_worker(pg_url: str, room: str, limit: int, go: str, users: list[str]) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.filters.join_rate_worker",
        pg_url,
        REDIS_URL,
        room,
        str(limit),
        go,
        *users,
        stdout=asyncio.subprocess.PIPE,
        cwd=WORKTREE,
        # This tree's code, whatever the interpreter has installed.
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [os.path.join(WORKTREE, "libs"), WORKTREE, os.environ.get("PYTHONPATH", "")]
            ),
        },
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.strip() == b"ready", line
    return proc


async def test_join_rate_window_is_shared_by_two_worker_processes(
    redis_client: aioredis.Redis, pg_database: str
) -> None:
    """Two processes, each its own pipeline and connections, judge 10 joins each of one
    room at the same moment: exactly the limit's worth pass in total."""
    room = new_room()
    go = f"test:go:{uuid.uuid4().hex}"
    limit = 5
    procs: list[Any] = []
    results: dict[str, str] = {}
    try:
        for w in range(2):
            users = [f"@w{w}u{i}:x.org" for i in range(10)]
            procs.append(await _start_worker(pg_database, room, limit, go, users))
        await redis_client.rpush(go, "a", "b")  # both start together
        for proc in procs:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0
            mine = orjson.loads(out.strip().splitlines()[-1])
            assert len(mine) == 10
            results.update(mine)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert len(results) == 20
    assert list(results.values()).count("neutral") == limit
    assert list(results.values()).count("prohibited") == 20 - limit
    assert await redis_client.zcard(redis_keys.join_rate(room)) == 20


# --- invite rate ---------------------------------------------------------------------


async def test_invite_rate_refuses_past_the_limit_per_sender(
    redis_client: aioredis.Redis, deps: FilterDeps
) -> None:
    p = pipeline(deps)
    cfg = config(invite_rate_filter_max_invites_per_minute=2, hellban_postfilter_minutes=0)
    room = new_room()
    inviter = "@inviter:x.org"
    key = redis_keys.invite_rate("c1", inviter)

    same = new_event_id()
    for _ in range(2):
        v = await judge(
            p, member(inviter, "@a:y.org", "invite", room), cfg, event_id=same, community="c1"
        )
        assert v.content_class is N
    second = await judge(p, member(inviter, "@b:y.org", "invite", new_room()), cfg, community="c1")
    assert second.content_class is N  # 2 invites: the limit, in any room of the community
    third = await judge(p, member(inviter, "@c:y.org", "invite", room), cfg, community="c1")
    assert third.content_class is P and third.harms == (SPAM_FLOODING,)
    assert refused_by(third) == {"invite_rate"}
    assert await redis_client.zcard(key) == 3

    # Another sender, or the same sender in another community, has a window of its own.
    assert (
        await judge(p, member("@other:x.org", "@c:y.org", "invite", room), cfg, community="c1")
    ).content_class is N
    assert (
        await judge(p, member(inviter, "@c:y.org", "invite", room), cfg, community="c2")
    ).content_class is N
    # An unproven invite does not fill anyone's window.
    quiet = redis_keys.invite_rate("c1", "@quiet:x.org")
    for target in ("@d:y.org", "@e:y.org", "@f:y.org"):
        await judge(
            p, member("@quiet:x.org", target, "invite", room), cfg, community="c1", verified=False
        )
    assert await redis_client.zcard(quiet) == 0
    # Joins are not invites.
    assert (
        await judge(p, member("@c:y.org", "@c:y.org", "join", room), cfg, community="c1")
    ).content_class is N
    assert not any(
        f.name == "invite_rate"
        for f in (await judge(p, member(inviter, "@g:y.org", "invite", room), config())).filters
    )


# --- policy list ---------------------------------------------------------------------


async def test_policy_list_refuses_joins_and_invites_of_banned_users_and_servers(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    policy_list.clear_rule_cache()
    lst = new_room()
    ban = {"recommendation": "m.ban"}
    rules = [
        state_event("m.policy.rule.user", "u", {"entity": "@banned:x.org", **ban}, "@mod:x.org"),
        state_event("m.policy.rule.server", "s", {"entity": "evil.org", **ban}, "@mod:x.org"),
    ]
    for i, rule in enumerate(rules):
        await room_state.apply_event(pg_pool, lst, rule, f"$rule{i}{uuid.uuid4().hex}")
    p = pipeline(deps)
    cfg = config(policy_list_room_ids=[lst], hellban_postfilter_minutes=0)
    room = new_room()

    async def verdict(ev: dict[str, Any]) -> Verdict:
        return await judge(p, ev, cfg)

    joined = await verdict(member("@banned:x.org", "@banned:x.org", "join", room))
    assert joined.content_class is P and joined.harms == (OTHER,)
    assert refused_by(joined) == {"policy_list"}
    assert (
        await verdict(member("@any:evil.org", "@any:evil.org", "join", room))
    ).content_class is P
    assert (await verdict(member("@fine:x.org", "@fine:x.org", "join", room))).content_class is N

    # An invite of a banned user, or of a user of a banned server, by a good user.
    invited = await verdict(member("@fine:x.org", "@banned:x.org", "invite", room))
    assert invited.content_class is P and refused_by(invited) == {"policy_list"}
    assert (await verdict(member("@fine:x.org", "@x:evil.org", "invite", room))).content_class is P
    # An invite sent by a banned user, and a fine invite.
    assert (
        await verdict(member("@banned:x.org", "@fine:x.org", "invite", room))
    ).content_class is P
    assert (await verdict(member("@fine:x.org", "@ok:x.org", "invite", room))).content_class is N
    # Kicking or banning the banned user is not refused by the list (only invites check
    # the target), nor is their own leave.
    assert (await verdict(member("@fine:x.org", "@banned:x.org", "leave", room))).content_class is N
    assert (
        await verdict(member("@banned:x.org", "@banned:x.org", "leave", room))
    ).content_class is N


# --- moderation ----------------------------------------------------------------------

MOD = "@mod:x.org"
USER = "@user:x.org"
SPAMMER = "@spammer:x.org"
_depths = iter(range(1, 10**6))


def state_event(
    event_type: str, state_key: str, content: dict[str, Any], sender: str
) -> dict[str, Any]:
    return {
        "type": event_type,
        "state_key": state_key,
        "sender": sender,
        "room_id": "!ignored:example.org",
        "content": content,
        "origin_server_ts": 1,
        "depth": next(_depths),
        "auth_events": [],
        "prev_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }


def moderation_room_state(room: str, levels: dict[str, int]) -> list[dict[str, Any]]:
    """A v10 room created by the first user; ``levels`` are the power levels, every
    listed user joined."""
    creator = next(iter(levels))
    events = [
        state_event("m.room.create", "", {"creator": creator, "room_version": "10"}, creator),
        state_event("m.room.power_levels", "", {"users": levels}, creator),
        state_event("m.room.join_rules", "", {"join_rule": "public"}, creator),
    ]
    events += [state_event("m.room.member", u, {"membership": "join"}, u) for u in levels]
    for ev in events:
        ev["room_id"] = room
    return events


def moderation_checks(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("warden_moderation_prefilter_checks_total", {"outcome": outcome})
        or 0.0
    )


async def test_moderators_are_not_refused_by_content_filters_others_are(
    pg_pool: asyncpg.Pool, deps: FilterDeps
) -> None:
    room = new_room()
    await room_state.seed_from_state(
        pg_pool,
        room,
        "10",
        moderation_room_state(room, {MOD: 100, USER: 0, SPAMMER: 0, OWN_USER: 0}),
    )
    p = pipeline(deps)
    # No event type is allowed by type alone: the moderation prefilter decides.
    cfg = config(
        event_type_prefilter_allowed_event_types=[],
        event_type_prefilter_allowed_state_event_types=[],
        hellban_postfilter_minutes=0,
    )

    def kick(sender: str) -> dict[str, Any]:
        return member(sender, SPAMMER, "leave", room, reason="spam")

    def ban(sender: str) -> dict[str, Any]:
        return member(sender, SPAMMER, "ban", room, reason="posting spam")

    def redaction(sender: str) -> dict[str, Any]:
        ev = event("m.room.redaction", {"reason": "spam"}, sender=sender, room_id=room)
        ev["redacts"] = "$spam"
        return ev

    def power_levels(sender: str) -> dict[str, Any]:
        users = {MOD: 100, USER: 0, SPAMMER: 0, OWN_USER: 0, "@spamhunter:x.org": 50}
        return event(
            "m.room.power_levels", {"users": users}, sender=sender, room_id=room, state_key=""
        )

    allowed_before = moderation_checks("allowed")
    for build in (kick, ban, redaction, power_levels):
        by_mod = await judge(p, build(MOD), cfg)
        assert by_mod.content_class is A, build.__name__
        assert by_mod.harms == ()
        assert "keyword" not in {f.name for f in by_mod.filters}  # content filters skipped
        by_user = await judge(p, build(USER), cfg)
        assert by_user.content_class is P and by_user.harms == (SPAM,), build.__name__
        assert refused_by(by_user) == {"keyword"}
    assert moderation_checks("allowed") - allowed_before == 4

    # Ordinary messages never look up state and the keyword still refuses a moderator's spam.
    msg = event("m.room.message", {"msgtype": "m.text", "body": "spam"}, sender=MOD, room_id=room)
    assert (await judge(p, msg, cfg)).content_class is P
    assert moderation_checks("allowed") - allowed_before == 4

    # protect_own_user still applies to a moderator.
    kick_us = member(MOD, OWN_USER, "leave", room, reason="bye")
    refused = await judge(p, kick_us, cfg)
    assert refused.content_class is P and refused_by(refused) == {"protect_own_user"}

    # A moderator cannot outrank an equal: kicking another level-100 user is not exempt.
    await room_state.seed_from_state(
        pg_pool,
        room,
        "10",
        moderation_room_state(room, {MOD: 100, "@peer:x.org": 100, USER: 0, SPAMMER: 0}),
    )
    peer_kick = member(MOD, "@peer:x.org", "leave", room, reason="spam")
    assert (await judge(p, peer_kick, cfg)).content_class is P

    # Only verified learned state and a proven sender decide.
    assert (await judge(p, ban(MOD), cfg, verified=False)).content_class is P
    unknown_room = member(MOD, SPAMMER, "ban", new_room(), reason="spam")
    assert (await judge(p, unknown_room, cfg)).content_class is P
    assert (await judge(p, ban(MOD), cfg, room_version="")).content_class is P
    assert (await judge(p, ban(MOD), cfg)).content_class is A


async def test_redacting_needs_the_redact_level(pg_pool: asyncpg.Pool, deps: FilterDeps) -> None:
    """A user may redact their own events at level 0, but that is no moderation: only
    the room's ``redact`` level earns the exemption."""
    room = new_room()
    levels = {MOD: 100, "@helper:x.org": 40, USER: 0}
    await room_state.seed_from_state(pg_pool, room, "10", moderation_room_state(room, levels))
    p = pipeline(deps)
    cfg = config(event_type_prefilter_allowed_event_types=[], hellban_postfilter_minutes=0)
    ev = event("m.room.redaction", {"reason": "spam"}, sender="@helper:x.org", room_id=room)
    ev["redacts"] = "$x"
    assert (await judge(p, ev, cfg)).content_class is P


async def test_a_failed_state_lookup_is_no_verdict(
    pg_database: str, redis_client: aioredis.Redis
) -> None:
    """Failures are not verdicts: judged without its exemption, a moderator's ban could
    be refused forever. With the database gone the evaluation is unavailable (503)."""
    from warden.policy.dependency_failures import EvaluationUnavailable

    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=1)
    await pool.close()
    p = pipeline(FilterDeps(redis=redis_client, pool=pool, local_user_id=OWN_USER))
    ban = member(MOD, SPAMMER, "ban", new_room(), reason="spam")
    cfg = config(event_type_prefilter_allowed_state_event_types=[], hellban_postfilter_minutes=0)
    failed_before = moderation_checks("failed")
    with pytest.raises(EvaluationUnavailable, match="moderation_prefilter"):
        await judge(p, ban, cfg)
    assert moderation_checks("failed") - failed_before == 1

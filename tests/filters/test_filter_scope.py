"""Dry run (``dry_run_filters``) and per-filter conditions (``filter_conditions``) in the
pipeline, on real Redis and PostgreSQL behind the filters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.filters.filter_helpers import ALICE, ROOM, config, event, message, new_event_id
from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.filters.registry import FILTERS
from warden.policy import filter_scope
from warden.policy import pipeline as pipeline_module
from warden.policy.config import ConfigError, EffectiveConfig, validate_community_config
from warden.policy.harms import OTHER, SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict

N = ContentClass.NEUTRAL
P = ContentClass.PROHIBITED
FLOODING = "org.matrix.msc4456.spam.flooding"
OTHER_ROOM = "!other:example.org"


class Exploding(Filter):
    """Raises on every event."""

    name = "test_scope_exploding"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        raise RuntimeError("boom")


class Sleeping(Filter):
    """Never answers in time."""

    name = "test_scope_sleeping"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        await asyncio.sleep(30)
        return FilterResult.neutral()


def make(deps: FilterDeps, *extra: type[Filter], timeout: float = 2.0) -> Pipeline:
    return Pipeline(deps, timeout_seconds=timeout, filters=(*FILTERS, *extra))


async def judge(
    p: Pipeline, ev: dict[str, Any], cfg: EffectiveConfig, *, sender_verified: bool = True
) -> Verdict:
    return await p.evaluate(
        dict(ev),
        event_id=new_event_id(),
        community_id="default",
        config=cfg,
        sender_verified=sender_verified,
    )


def by_name(v: Verdict) -> dict[str, FilterOutcome]:
    return {f.name: f for f in v.filters}


async def hellbanned(redis: aioredis.Redis, user: str = ALICE) -> bool:
    return bool(await redis.exists(redis_keys.hellban("default", user)))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- dry run -----------------------------------------------------------------------


async def test_dry_run_refusal_is_recorded_but_decides_nothing(
    deps: FilterDeps, redis_client: aioredis.Redis
) -> None:
    before = sample(
        "warden_filter_dry_run_outcomes_total", filter="keyword", **{"class": "prohibited"}
    )
    v = await judge(make(deps), message("spam"), config(dry_run_filters=["keyword"]))
    assert v.content_class is N and v.harms == ()
    keyword = by_name(v)["keyword"]
    assert keyword.dry_run and keyword.content_class is P and keyword.harms == (SPAM,)
    assert "hellban_postfilter" not in by_name(v)
    assert not await hellbanned(redis_client)
    # The audit record carries it, and reads back the same.
    record = next(f for f in v.to_dict()["filters"] if f["name"] == "keyword")
    assert record["dry_run"] is True
    back = by_name(Verdict.from_json(v.to_json()))
    assert back["keyword"].dry_run and not back["length"].dry_run
    assert "dry_run" not in next(f for f in v.to_dict()["filters"] if f["name"] == "length")
    after = sample(
        "warden_filter_dry_run_outcomes_total", filter="keyword", **{"class": "prohibited"}
    )
    assert after == before + 1
    # Without the key the same message is refused, as before.
    v = await judge(make(deps), message("spam"), config())
    assert v.content_class is P and not by_name(v)["keyword"].dry_run


async def test_live_refusal_still_counts_beside_a_dry_run_one(
    deps: FilterDeps, redis_client: aioredis.Redis
) -> None:
    v = await judge(make(deps), message("spam " + "@" * 25), config(dry_run_filters=["keyword"]))
    assert v.content_class is P and v.harms == (FLOODING,)  # many_ats only
    assert by_name(v)["keyword"].dry_run
    assert await hellbanned(redis_client)  # for the live refusal


async def test_postfilter_ignores_dry_run_refusals(
    deps: FilterDeps, redis_client: aioredis.Redis
) -> None:
    # Live: prohibited only because a filter failed (no hellban for an outage). The
    # dry-run keyword refusal beside it must not turn that into a hellban either.
    v = await judge(make(deps, Exploding), message("spam"), config(dry_run_filters=["keyword"]))
    assert v.content_class is P and v.harms == (OTHER,)
    assert by_name(v)["keyword"].dry_run and by_name(v)["keyword"].content_class is P
    assert "hellban_postfilter" in by_name(v)
    assert not await hellbanned(redis_client)


async def test_hellban_postfilter_in_dry_run_sets_no_ban(
    deps: FilterDeps, redis_client: aioredis.Redis
) -> None:
    v = await judge(make(deps), message("spam"), config(dry_run_filters=["hellban_postfilter"]))
    assert v.content_class is P and v.harms == (SPAM,)
    assert by_name(v)["hellban_postfilter"].dry_run
    assert not await hellbanned(redis_client)


async def test_every_filter_in_dry_run(deps: FilterDeps, redis_client: aioredis.Redis) -> None:
    await redis_client.set(redis_keys.hellban("default", ALICE), b"1", ex=60)
    v = await judge(make(deps), message("spam " + "@" * 25), config(dry_run_filters=["*"]))
    assert v.content_class is N and v.harms == ()
    assert all(f.dry_run for f in v.filters)
    assert by_name(v)["hellban_prefilter"].content_class is P  # would have refused
    assert {"keyword", "many_ats"} <= set(by_name(v))


async def test_dry_run_allow_list_does_not_let_spam_through(deps: FilterDeps) -> None:
    cfg = config(sender_prefilter_allowed_senders=[ALICE], dry_run_filters=["sender_prefilter"])
    v = await judge(make(deps), message("spam"), cfg)
    assert by_name(v)["sender_prefilter"].content_class is ContentClass.ALLOWED
    assert by_name(v)["sender_prefilter"].dry_run
    assert v.content_class is P and v.harms == (SPAM,)


async def test_failing_dry_run_filter_never_gives_the_evaluation_up(deps: FilterDeps) -> None:
    p = make(deps, Sleeping, Exploding, timeout=0.2)
    cfg = config(dry_run_filters=["test_scope_sleeping", "test_scope_exploding"])
    v = await judge(p, message("hello"), cfg)
    assert v.content_class is N
    sleeping, exploding = by_name(v)["test_scope_sleeping"], by_name(v)["test_scope_exploding"]
    assert sleeping.dry_run and sleeping.error and "timed out" in sleeping.error
    assert exploding.dry_run and exploding.error and exploding.content_class is P


async def test_scope_is_worked_out_once_per_configuration(
    deps: FilterDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    real = filter_scope.compile_scope

    def counting(cfg: Any) -> Any:
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(pipeline_module, "compile_scope", counting)
    p = make(deps)
    plain, scoped = config(), config(dry_run_filters=["keyword"])
    for _ in range(3):
        await judge(p, message("hello"), plain)
        await judge(p, message("hello"), scoped)
    assert len(calls) == 2
    assert real(plain) is None  # neither key set: nothing to do per event


# --- conditions --------------------------------------------------------------------


async def test_condition_on_rooms(deps: FilterDeps) -> None:
    before = sample("warden_filter_condition_skips_total", filter="keyword")
    cfg = config(
        hellban_postfilter_minutes=0, filter_conditions={"keyword": {"room_ids": [OTHER_ROOM]}}
    )
    v = await judge(make(deps), message("spam"), cfg)  # in ROOM
    assert v.content_class is N and "keyword" not in by_name(v)
    assert sample("warden_filter_condition_skips_total", filter="keyword") == before + 1
    v = await judge(make(deps), event(content={"body": "spam"}, room_id=OTHER_ROOM), cfg)
    assert v.content_class is P and v.harms == (SPAM,)

    cfg = config(
        hellban_postfilter_minutes=0, filter_conditions={"keyword": {"not_room_ids": [ROOM]}}
    )
    assert (await judge(make(deps), message("spam"), cfg)).content_class is N
    v = await judge(make(deps), event(content={"body": "spam"}, room_id=OTHER_ROOM), cfg)
    assert v.content_class is P


async def test_condition_on_event_types(deps: FilterDeps) -> None:
    cfg = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"event_types": ["org.example.note"]}},
    )
    assert (await judge(make(deps), message("spam"), cfg)).content_class is N
    v = await judge(make(deps), event("org.example.note", {"body": "spam"}), cfg)
    assert v.content_class is P and v.harms == (SPAM,)


async def test_every_field_given_must_match(deps: FilterDeps) -> None:
    cfg = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"room_ids": [ROOM], "event_types": ["org.example.note"]}},
    )
    assert (await judge(make(deps), message("spam"), cfg)).content_class is N
    assert (await judge(make(deps), event("org.example.note", {"body": "spam"}), cfg)).prohibited
    other = event("org.example.note", {"body": "spam"}, room_id=OTHER_ROOM)
    assert not (await judge(make(deps), other, cfg)).prohibited


@pytest.mark.parametrize(
    ("sender", "runs"),
    [
        ("@a:spam.evil.example", True),
        ("@a:EVIL.example", True),  # server names compare as DNS names do
        ("@a:evil.example:8448", False),  # a glob without a port matches no port
        ("@a:example.org", False),
    ],
)
async def test_condition_on_sender_servers(deps: FilterDeps, sender: str, runs: bool) -> None:
    cfg = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"sender_servers": ["evil.example", "*.evil.example"]}},
    )
    v = await judge(make(deps), event(content={"body": "spam"}, sender=sender), cfg)
    assert v.prohibited is runs
    assert ("keyword" in by_name(v)) is runs


async def test_condition_not_sender_servers(deps: FilterDeps) -> None:
    cfg = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"not_sender_servers": ["*.trusted.example"]}},
    )
    trusted = event(content={"body": "spam"}, sender="@a:hs.trusted.example")
    assert not (await judge(make(deps), trusted, cfg)).prohibited
    assert (await judge(make(deps), message("spam"), cfg)).prohibited


async def test_server_conditions_never_skip_a_filter_for_an_unverified_sender(
    deps: FilterDeps,
) -> None:
    # The server part of an unverified sender is only a claim: the filter runs.
    only_evil = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"sender_servers": ["evil.example"]}},
    )
    claims_good = event(content={"body": "spam"}, sender="@a:good.example")
    assert not (await judge(make(deps), claims_good, only_evil)).prohibited
    v = await judge(make(deps), claims_good, only_evil, sender_verified=False)
    assert v.prohibited and "keyword" in by_name(v)

    not_trusted = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"not_sender_servers": ["trusted.example"]}},
    )
    claims_trusted = event(content={"body": "spam"}, sender="@a:trusted.example")
    assert not (await judge(make(deps), claims_trusted, not_trusted)).prohibited
    assert (await judge(make(deps), claims_trusted, not_trusted, sender_verified=False)).prohibited
    # Room and type conditions are signed: they still apply.
    room_only = config(
        hellban_postfilter_minutes=0,
        filter_conditions={"keyword": {"room_ids": [OTHER_ROOM], "sender_servers": ["*"]}},
    )
    assert not (await judge(make(deps), claims_good, room_only, sender_verified=False)).prohibited


async def test_conditions_and_dry_run_together(deps: FilterDeps) -> None:
    cfg = config(
        dry_run_filters=["keyword"], filter_conditions={"keyword": {"room_ids": [OTHER_ROOM]}}
    )
    assert "keyword" not in by_name(await judge(make(deps), message("spam"), cfg))
    v = await judge(make(deps), event(content={"body": "spam"}, room_id=OTHER_ROOM), cfg)
    assert not v.prohibited and by_name(v)["keyword"].dry_run


async def test_stored_conditions_that_no_longer_validate_lose_only_their_entry(
    deps: FilterDeps,
) -> None:
    # As a row written before a filter was removed: not through validation.
    cfg = config(
        hellban_postfilter_minutes=0,
        filter_conditions={
            "removed_filter": {"room_ids": [ROOM]},
            "length": {"rooms": [ROOM]},
            "keyword": {"room_ids": [OTHER_ROOM]},
        },
    )
    v = await judge(make(deps), message("spam"), cfg)
    assert not v.prohibited and "keyword" not in by_name(v)
    assert "length" in by_name(v)  # its bad entry dropped: runs everywhere


# --- validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"dry_run_filters": ["keyword", "no_such_filter"]}, "'no_such_filter'"),
        ({"dry_run_filters": ["sender_id"]}, "'sender_id'"),  # an outcome, not a filter
        ({"dry_run_filters": ["*", "keyword"]}, '"*"'),
        ({"dry_run_filters": "keyword"}, "dry_run_filters"),
        ({"filter_conditions": []}, "filter_conditions"),
        ({"filter_conditions": {"kwyword": {"room_ids": [ROOM]}}}, "'kwyword'"),
        ({"filter_conditions": {"keyword": {"rooms": [ROOM]}}}, "'rooms'"),
        ({"filter_conditions": {"keyword": []}}, "filter_conditions.keyword"),
        ({"filter_conditions": {"keyword": {"room_ids": []}}}, "room_ids"),
        ({"filter_conditions": {"keyword": {"room_ids": "!a:b"}}}, "room_ids"),
        ({"filter_conditions": {"keyword": {"room_ids": ["a:b"]}}}, "'a:b'"),
        ({"filter_conditions": {"keyword": {"event_types": [""]}}}, "event_types"),
        ({"filter_conditions": {"keyword": {"sender_servers": ["?" * 40]}}}, "sender_servers"),
        ({"filter_conditions": {"keyword": {"sender_servers": ["a" * 300]}}}, "sender_servers"),
        (
            {"filter_conditions": {"keyword": {"not_room_ids": ["!a"] * 1001}}},
            "not_room_ids",
        ),
    ],
)
def test_invalid_values_are_refused_naming_them(data: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_community_config(data)
    assert named in str(caught.value), str(caught.value)
    assert str(caught.value).startswith(next(iter(data))), str(caught.value)


def test_valid_values_are_kept() -> None:
    data = {
        "dry_run_filters": ["keyword", "many_ats", "keyword"],
        "filter_conditions": {
            "keyword": {
                "room_ids": [ROOM],
                "not_room_ids": [],
                "event_types": ["m.room.message"],
                "sender_servers": ["*.example.org"],
                "not_sender_servers": ["good.example.org"],
            }
        },
    }
    out = validate_community_config(data)
    assert out["dry_run_filters"] == ["keyword", "many_ats"]
    assert out["filter_conditions"] == data["filter_conditions"]
    assert validate_community_config({"dry_run_filters": ["*"]}) == {"dry_run_filters": ["*"]}


def test_instance_defaults_from_the_environment_are_validated_too() -> None:
    cfg = config({"PS_FILTER_CONDITIONS": '{"keyword": {"room_ids": ["!x:y"]}}'})
    assert cfg["filter_conditions"] == {"keyword": {"room_ids": ["!x:y"]}}
    with pytest.raises(ConfigError) as caught:
        config({"PS_FILTER_CONDITIONS": '{"nope": {}}'})
    assert caught.value.key == "PS_FILTER_CONDITIONS" and "'nope'" in caught.value.message
    with pytest.raises(ConfigError):
        config({"PS_FILTER_CONDITIONS": "[1]"})
    with pytest.raises(ConfigError) as caught:
        config({"PS_DRY_RUN_FILTERS": "keyword,nope"})
    assert caught.value.key == "PS_DRY_RUN_FILTERS"
    assert config({"PS_DRY_RUN_FILTERS": "keyword"})["dry_run_filters"] == ["keyword"]

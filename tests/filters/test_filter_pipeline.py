"""The decision pipeline: group gating, combining, failures, concurrency."""

from __future__ import annotations

import asyncio
from dataclasses import FrozenInstanceError, replace
from typing import ClassVar

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from prometheus_client import REGISTRY

from tests.cut_connections import cut_connection
from tests.filters.filter_helpers import ALICE, OWN_USER, config, event, message, new_event_id
from tests.service_processes import free_port
from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.filters.registry import FILTERS
from warden.policy.config import EffectiveConfig
from warden.policy.dependency_failures import (
    DependencyUnavailable,
    EvaluationUnavailable,
    is_dependency_failure,
)
from warden.policy.harms import OTHER, SPAM, SPEC_NON_COMPLIANCE
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict, new_outcome

N = ContentClass.NEUTRAL
A = ContentClass.ALLOWED
P = ContentClass.PROHIBITED


class Exploding(Filter):
    """Raises on every event."""

    name = "test_exploding"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        raise RuntimeError("boom")


class Sleeping(Filter):
    """Never answers in time."""

    name = "test_sleeping"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        await asyncio.sleep(30)
        return FilterResult.neutral()


class Rendezvous(Filter):
    """Two filters that each finish only once the other has started: they can only
    both succeed when a group's filters run concurrently."""

    group = Group.MAIN
    started: ClassVar[dict[str, asyncio.Event]] = {}
    other: ClassVar[str]

    async def check(self, ctx: FilterContext) -> FilterResult:
        self.started.setdefault(self.name, asyncio.Event()).set()
        await self.started.setdefault(self.other, asyncio.Event()).wait()
        return FilterResult.neutral()


class RendezvousA(Rendezvous):
    name = "test_rendezvous_a"
    other = "test_rendezvous_b"


class RendezvousB(Rendezvous):
    name = "test_rendezvous_b"
    other = "test_rendezvous_a"


def pipeline(
    deps: FilterDeps,
    *extra: type[Filter],
    timeout: float = 2.0,
    hook: list[FilterOutcome] | None = None,
) -> Pipeline:
    return Pipeline(
        deps,
        timeout_seconds=timeout,
        filters=(*FILTERS, *extra),
        on_outcome=hook.append if hook is not None else None,
    )


async def judge(p: Pipeline, ev: dict[str, object], cfg: EffectiveConfig | None = None) -> Verdict:
    return await p.evaluate(
        dict(ev), event_id=new_event_id(), community_id="default", config=cfg or config()
    )


def ran(v: Verdict) -> set[str]:
    return {f.name for f in v.filters}


async def test_neutral_message_runs_every_enabled_group(deps: FilterDeps) -> None:
    v = await judge(pipeline(deps), message("hello there"))
    assert v.content_class is N and v.harms == ()
    assert {"protect_own_user", "event_type_prefilter", "hellban_prefilter", "keyword"} <= ran(v)
    assert "hellban_postfilter" not in ran(v)  # only on prohibited
    assert v.sender == ALICE and v.event_type == "m.room.message" and v.room_id


async def test_allowed_from_prefilters_skips_content_filters(deps: FilterDeps) -> None:
    redaction = event("m.room.redaction", {"reason": "spam spam spam"})
    v = await judge(pipeline(deps), redaction)
    assert v.content_class is A
    assert ran(v) == {
        "protect_own_user",
        "event_type_prefilter",
        "moderation_prefilter",
        "unsafe_signing_key",
    }
    cfg = config(sender_prefilter_allowed_senders=[ALICE])
    v = await judge(pipeline(deps), message("spam"), cfg)
    assert v.content_class is A and "keyword" not in ran(v) and "hellban_prefilter" not in ran(v)


async def test_protecting_our_user_beats_an_allowed_sender(deps: FilterDeps) -> None:
    kick = event("m.room.member", {"membership": "leave"}, state_key=OWN_USER)
    cfg = config(sender_prefilter_allowed_senders=[ALICE])
    v = await judge(pipeline(deps), kick, cfg)
    assert v.content_class is P and v.harms == (OTHER,)
    by_name = {f.name: f for f in v.filters}
    assert by_name["sender_prefilter"].content_class is A
    assert by_name["protect_own_user"].content_class is P


async def test_prohibited_harms_union_and_postfilter(deps: FilterDeps) -> None:
    # keyword (spam) + many ats (flooding) in one event; hellban postfilter runs.
    v = await judge(pipeline(deps), message("spam " + "@" * 25))
    assert v.content_class is P
    assert set(v.harms) == {SPAM, "org.matrix.msc4456.spam.flooding"}
    assert "hellban_postfilter" in ran(v)


async def test_sender_not_a_user_id(deps: FilterDeps) -> None:
    for sender in ("alice", "@alice", "", "!room:x"):
        v = await judge(pipeline(deps), event(content={"body": "hi"}, sender=sender))
        assert v.content_class is P
        assert v.harms == tuple(sorted((SPAM, SPEC_NON_COMPLIANCE)))
    ev = message("hi")
    del ev["sender"]
    assert (await judge(pipeline(deps), ev)).content_class is P


async def test_failing_filter_fail_secure(deps: FilterDeps) -> None:
    seen: list[FilterOutcome] = []
    v = await judge(pipeline(deps, Exploding, hook=seen), message("hello"))
    assert v.content_class is P and v.harms == (OTHER,)
    outcome = next(f for f in v.filters if f.name == "test_exploding")
    assert outcome.error is not None and "boom" in outcome.error
    assert outcome.content_class is P
    assert any(o.name == "test_exploding" and o.error for o in seen)  # metrics hook saw it


async def test_failing_filter_fail_open(deps: FilterDeps) -> None:
    cfg = config(test_exploding_fail_secure=False)
    v = await judge(pipeline(deps, Exploding), message("hello"), cfg)
    assert v.content_class is N and v.harms == ()
    outcome = next(f for f in v.filters if f.name == "test_exploding")
    assert outcome.error is not None and outcome.content_class is N


async def test_timed_out_filter(deps: FilterDeps) -> None:
    """A filter waiting on I/O past the timeout is a dependency failure: no verdict at
    all when fail-secure (the event is judged again later), neutral when fail-open."""
    seen: list[FilterOutcome] = []
    p = pipeline(deps, Sleeping, timeout=0.2, hook=seen)
    with pytest.raises(EvaluationUnavailable) as caught:
        await judge(p, message("hello"))
    assert caught.value.filter_name == "test_sleeping" and "timed out" in caught.value.error
    assert any(o.name == "test_sleeping" and o.error for o in seen)  # metrics hook saw it
    v = await judge(p, message("hello"), config(test_sleeping_fail_secure=False))
    assert v.content_class is N
    assert next(f for f in v.filters if f.name == "test_sleeping").error is not None


class RedisDown(Filter):
    """Its Redis cannot be reached (a real client pointed at a closed port)."""

    name = "test_redis_down"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
        try:
            await client.get("x")
        finally:
            await client.aclose()
        return FilterResult.neutral()


class DatabaseLocked(Filter):
    """Its PostgreSQL query is cancelled by the server (too slow: statement_timeout)."""

    name = "test_database_locked"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        async with ctx.deps.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 10")
            await conn.execute("SELECT pg_sleep(1)")
        return FilterResult.neutral()


class BadQuery(Filter):
    """A bug: its SQL is wrong. That is not a dependency failure."""

    name = "test_bad_query"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        await ctx.deps.pool.execute("SELECT no_such_column FROM verdicts")
        return FilterResult.neutral()


class SaysUnavailable(Filter):
    """A classifier-backed filter whose service answered 503."""

    name = "test_says_unavailable"
    group = Group.MAIN

    async def check(self, ctx: FilterContext) -> FilterResult:
        raise DependencyUnavailable("classifier answered 503")


@pytest.mark.parametrize("failing", [RedisDown, DatabaseLocked, SaysUnavailable])
async def test_dependency_failure_gives_no_verdict_and_no_hellban(
    deps: FilterDeps, failing: type[Filter]
) -> None:
    """Even with a content filter refusing the event in the same group, a dependency
    failure gives up the evaluation before the hellban postfilter runs."""
    from warden import redis_keys

    with pytest.raises(EvaluationUnavailable) as caught:
        await judge(pipeline(deps, failing), message("buy spam now"))
    assert caught.value.filter_name == failing.name
    assert not await deps.redis.exists(redis_keys.hellban("default", ALICE))

    # Fail-open: the community chose availability, the filter counts as neutral.
    v = await judge(
        pipeline(deps, failing), message("hello"), config(**{f"{failing.name}_fail_secure": False})
    )
    assert v.content_class is N


async def test_filter_bug_keeps_fail_secure_refusal(deps: FilterDeps) -> None:
    v = await judge(pipeline(deps, BadQuery), message("hello"))
    assert v.content_class is P and v.harms == (OTHER,)
    outcome = next(f for f in v.filters if f.name == "test_bad_query")
    assert outcome.error is not None and "UndefinedColumnError" in outcome.error


def test_dependency_failure_classification() -> None:
    assert is_dependency_failure(TimeoutError())
    assert is_dependency_failure(ConnectionRefusedError())
    assert is_dependency_failure(redis_errors.ConnectionError("gone"))
    assert is_dependency_failure(redis_errors.ResponseError("LOADING Redis is loading"))
    assert is_dependency_failure(asyncpg.exceptions.QueryCanceledError("cancelled"))
    assert is_dependency_failure(asyncpg.exceptions.TooManyConnectionsError("too many"))
    assert is_dependency_failure(asyncpg.exceptions.LockNotAvailableError("lock"))
    assert is_dependency_failure(asyncpg.exceptions.ConnectionDoesNotExistError("closed"))
    # A pooled connection cut by a PostgreSQL shutting down: not a bug of the filter, so
    # not a refusal (it was, until this case was known).
    assert is_dependency_failure(cut_connection())
    assert not is_dependency_failure(redis_errors.ResponseError("ERR wrong number of args"))
    assert not is_dependency_failure(asyncpg.exceptions.UndefinedColumnError("bug"))
    assert not is_dependency_failure(asyncpg.exceptions.UniqueViolationError("bug"))
    assert not is_dependency_failure(KeyError("bug"))
    assert not is_dependency_failure(FileNotFoundError("model.bin"))


async def test_failure_alone_does_not_hellban(deps: FilterDeps) -> None:
    """A verdict prohibited only because a filter failed must not punish the sender."""
    from warden import redis_keys

    v = await judge(pipeline(deps, Exploding), message("hello"))
    assert v.content_class is P and "hellban_postfilter" in ran(v)
    assert not await deps.redis.exists(redis_keys.hellban("default", ALICE))


async def test_filters_in_a_group_run_concurrently(deps: FilterDeps) -> None:
    Rendezvous.started.clear()
    v = await judge(pipeline(deps, RendezvousA, RendezvousB, timeout=5.0), message("hello"))
    outcomes = {f.name: f for f in v.filters}
    assert outcomes["test_rendezvous_a"].error is None
    assert outcomes["test_rendezvous_b"].error is None
    assert v.content_class is N


class Inline(Filter):
    """Computes only: records which task ran it."""

    name = "test_inline"
    group = Group.MAIN
    waits_on_io = False
    tasks: ClassVar[list[asyncio.Task[object] | None]] = []

    async def check(self, ctx: FilterContext) -> FilterResult:
        self.tasks.append(asyncio.current_task())
        return FilterResult.neutral()


async def test_filters_that_only_compute_run_in_the_evaluations_own_task(
    deps: FilterDeps,
) -> None:
    Inline.tasks.clear()
    Rendezvous.started.clear()
    p = pipeline(deps, Inline, RendezvousA, RendezvousB, timeout=5.0)
    # The I/O filters of the group still run concurrently beside it.
    v = await asyncio.ensure_future(judge(p, message("hello")))
    assert v.content_class is N
    assert [f.name for f in v.filters if f.name.startswith("test_")] == [
        "test_inline",
        "test_rendezvous_a",
        "test_rendezvous_b",
    ]
    assert len(Inline.tasks) == 1
    evaluation = asyncio.current_task()
    assert Inline.tasks[0] is not evaluation  # ensure_future made the evaluation's task
    assert Inline.tasks[0] is not None and Inline.tasks[0].get_coro().__name__ == "judge"


@pytest.mark.parametrize(
    "ev",
    [
        message("hello"),
        message("@alice:example.org @bob:example.org " * 20),
        message("x" * 5000),
        message("img", msgtype="m.image"),
        event("m.room.member", {"membership": "ban"}, state_key=OWN_USER),
        event("m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "key": "x"}}),
    ],
)
async def test_filters_declared_not_to_wait_on_io_never_suspend(
    deps: FilterDeps, ev: dict[str, object]
) -> None:
    """``waits_on_io = False`` is a promise: ``check`` finishes without suspending, except
    for the events a ``waits_on_io_sometimes`` filter's ``waits_for`` names."""
    from tests.filters.filter_helpers import context

    inline = [cls for cls in FILTERS if not cls.waits_on_io]
    assert len(inline) >= 5
    for cls in inline:
        ctx = context(dict(ev), deps)
        if cls.waits_on_io_sometimes and cls().waits_for(ctx):
            continue
        coro = cls().check(ctx)
        try:
            coro.send(None)
        except StopIteration:
            continue
        coro.close()
        raise AssertionError(f"{cls.name} suspended: it waits on something")


class Sometimes(Filter):
    """Waits on I/O for ``m.sticker`` only (as ``untrusted_media`` for media)."""

    name = "test_sometimes"
    group = Group.MAIN
    waits_on_io = False
    waits_on_io_sometimes = True
    tasks: ClassVar[list[asyncio.Task[object] | None]] = []

    def waits_for(self, ctx: FilterContext) -> bool:
        return ctx.event_type == "m.sticker"

    async def check(self, ctx: FilterContext) -> FilterResult:
        self.tasks.append(asyncio.current_task())
        if ctx.event_type == "m.sticker":
            await asyncio.sleep(30)  # a lookup that never answers
        return FilterResult.neutral()


async def test_a_filter_waiting_for_some_events_is_timed_for_those_inline_for_others(
    deps: FilterDeps,
) -> None:
    Sometimes.tasks.clear()
    p = pipeline(deps, Sometimes, timeout=0.2)
    # The events it names get an I/O filter's timer: a stuck lookup is a dependency
    # failure (no verdict), not a hang.
    with pytest.raises(EvaluationUnavailable) as caught:
        await judge(p, event("m.sticker", {"body": "s", "url": "mxc://x/y"}))
    assert caught.value.filter_name == "test_sometimes" and "timed out" in caught.value.error
    # Other events run inline, in the evaluation's own task.
    Sometimes.tasks.clear()
    v = await asyncio.ensure_future(judge(p, message("hello")))
    assert v.content_class is N
    assert len(Sometimes.tasks) == 1
    task = Sometimes.tasks[0]
    assert task is not None and task.get_coro().__name__ == "judge"


def test_the_pipelines_fast_outcome_is_an_ordinary_frozen_outcome() -> None:
    """``new_outcome`` (the pipeline's, per filter per event) makes the same immutable
    ``FilterOutcome`` as its constructor: equal, same hash, frozen, every field set."""
    args = ("keyword", ContentClass.PROHIBITED, ("org.matrix.msc4456.spam",), "boom", 1.25)
    fast, slow = new_outcome(*args), FilterOutcome(*args)
    assert fast == slow and hash(fast) == hash(slow) and fast.dry_run is False
    assert fast.to_dict() == slow.to_dict()
    assert FilterOutcome.from_dict(fast.to_dict()) == slow
    with pytest.raises(FrozenInstanceError):
        fast.name = "other"  # type: ignore[misc]
    assert replace(fast, dry_run=True).dry_run is True


class Acting(Filter):
    """A postfilter that starts a side effect of the verdict, held until ``release``."""

    name = "test_acting"
    group = Group.POSTFILTER
    waits_on_io = False
    release: ClassVar[asyncio.Event]
    done: ClassVar[list[str]] = []
    fail: ClassVar[bool] = False

    async def check(self, ctx: FilterContext) -> FilterResult:
        async def act() -> None:
            await Acting.release.wait()
            if Acting.fail:
                raise RuntimeError("the write failed")
            Acting.done.append(ctx.event_id)

        ctx.start_effect(self.name, act())
        return FilterResult.neutral()


async def test_effects_are_waited_for_here_or_handed_to_the_caller(
    deps: FilterDeps, caplog: pytest.LogCaptureFixture
) -> None:
    """``start_effect``: without an ``effects`` list ``evaluate`` returns only once the
    effect is done (the text checks and the homeserver callbacks rely on it); with one,
    it returns the verdict at once and the caller holds the running effect (the filter
    worker waits for it during the commit). A failing effect is logged; the verdict
    stands."""
    p = pipeline(deps, Acting)
    Acting.release, Acting.done, Acting.fail = asyncio.Event(), [], False
    spam = message("buy spam")
    cfg = config(hellban_postfilter_minutes=0)  # the only effect is the test's

    waited = asyncio.create_task(judge(p, spam, cfg))
    await asyncio.sleep(0.05)
    assert not waited.done()  # held by its effect
    Acting.release.set()
    assert (await waited).content_class is P and len(Acting.done) == 1

    Acting.release = asyncio.Event()
    effects: list[asyncio.Task[None]] = []
    v = await p.evaluate(
        dict(spam),
        event_id=new_event_id(),
        community_id="default",
        config=cfg,
        effects=effects,
    )
    assert v.content_class is P and "test_acting" in ran(v)
    assert len(effects) == 1 and not effects[0].done() and len(Acting.done) == 1
    Acting.release.set()
    await asyncio.wait(effects)
    assert Acting.done == [Acting.done[0], v.event_id]

    Acting.release, Acting.fail = asyncio.Event(), True
    Acting.release.set()
    failures = REGISTRY.get_sample_value(
        "warden_filter_effect_failures_total", {"filter": "test_acting"}
    )
    with caplog.at_level("WARNING", logger="warden.filters.base"):
        v = await judge(p, spam, cfg)
    assert v.content_class is P and (v.filters[-1].name, v.filters[-1].error) == (
        "test_acting",
        None,
    )
    assert [r.getMessage() for r in caplog.records] == ["filter effect failed"]
    assert (
        REGISTRY.get_sample_value("warden_filter_effect_failures_total", {"filter": "test_acting"})
        == (failures or 0) + 1
    )

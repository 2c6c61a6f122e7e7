"""The decision pipeline: run a community's filters over one event and give a verdict.

policyserv's group model (reference §3.1-3.2):

====  ======================  ==========================
group  runs when the class is  filters
====  ======================  ==========================
0     any                     prefilters (allow lists, protecting our user)
1     neutral                 hellban prefilter
2     neutral                 content filters
3     prohibited              hellban postfilter
====  ======================  ==========================

Filters of a group run concurrently (those that wait on I/O; the others take turns, as
they would on one event loop anyway); the group's class is the maximum of its members
and its harms their union, so a prohibiting prefilter beats an allowing one. The final
class is the maximum over groups, normalised (harms force prohibited; prohibited needs a
harm). An event whose sender is not a user ID is prohibited before any group runs.

A community can narrow where a filter runs (``filter_conditions``) and run filters in
dry run (``dry_run_filters``): their outcomes are recorded but count for nothing
(``warden.policy.filter_scope``, worked out once per configuration like ``enabled``).

A filter that raises or exceeds the timeout fails one of two ways
(``warden.policy.dependency_failures`` tells them apart):

- a dependency failure (PostgreSQL, Redis or the network failed or was slow): when the
  filter's ``<name>_fail_secure`` key is true (the default) the evaluation is given up
  (``EvaluationUnavailable``, before any later group runs, so no hellban is set): no
  verdict, and the event is judged again on the next ask. When false the filter counts
  as neutral, as the community chose availability;
- anything else is a bug in the filter: its outcome records the error and counts as
  prohibited (``org.matrix.msc4456.other``) when ``<name>_fail_secure`` is true or
  neutral when false. So one faulty filter costs one judgement, not the whole
  community's traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.matrix.event_hashes import covered_event
from warden.policy.config import EffectiveConfig
from warden.policy.dependency_failures import EvaluationUnavailable, is_dependency_failure
from warden.policy.filter_scope import Scope, compile_scope, dry_context, mark_dry_run
from warden.policy.harms import OTHER, SPAM, SPEC_NON_COMPLIANCE
from warden.policy.verdict import (
    SENDER_UNVERIFIED,
    ContentClass,
    FilterOutcome,
    Verdict,
    new_outcome,
    normalise,
)
from warden.telemetry.tracing import exporting, tracer

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

SENDER_CHECK = "sender_id"  # the outcome name of the built-in sender check

# Which running classes let each group run.
_RUNS_WHEN: dict[Group, frozenset[ContentClass]] = {
    Group.PREFILTER: frozenset(ContentClass),
    Group.HELLBAN_PREFILTER: frozenset({ContentClass.NEUTRAL}),
    Group.MAIN: frozenset({ContentClass.NEUTRAL}),
    Group.POSTFILTER: frozenset({ContentClass.PROHIBITED}),
}

OutcomeHook = Callable[[FilterOutcome], None]
_Groups = list[tuple[Group, list[Filter]]]

# Configurations whose enabled filters a pipeline remembers (one per community in use).
_ACTIVE_CACHE_SIZE = 256


def is_user_id(value: object) -> bool:
    """A plausible user ID: ``@localpart:server`` (the gateway validated the rest)."""
    if not isinstance(value, str) or not value.startswith("@"):
        return False
    localpart, sep, server = value[1:].partition(":")
    return bool(sep and localpart and server)


def _sender_signatures(event: dict[str, Any]) -> dict[str, Any]:
    """``signatures[<sender's server>]`` of ``event`` ({} when absent or malformed)."""
    signatures = event.get("signatures")
    sender = event.get("sender")
    if not isinstance(signatures, dict) or not isinstance(sender, str):
        return {}
    by_server = signatures.get(sender.partition(":")[2])
    return by_server if isinstance(by_server, dict) else {}


def now_ms() -> int:
    """Wall-clock milliseconds."""
    return int(time.time() * 1000)


class Pipeline:
    """Runs filters over events. One per process; safe for concurrent use."""

    def __init__(
        self,
        deps: FilterDeps,
        *,
        timeout_seconds: float,
        filters: Iterable[type[Filter]] | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        if filters is None:
            from warden.filters.registry import FILTERS

            filters = FILTERS
        self.deps = deps
        self.timeout_seconds = timeout_seconds
        self._on_outcome = on_outcome
        instances = [cls() for cls in filters]
        self._groups: list[tuple[Group, list[Filter]]] = [
            (g, [f for f in instances if f.group is g]) for g in Group
        ]
        # The filters each group runs, per configuration object (``id`` → the object,
        # kept so its ``id`` is not reused, and the groups). ``enabled`` depends on the
        # configuration alone, and the worker reuses one object per community until it
        # changes, so this is worked out once rather than for every event.
        # With them, the configuration's dry-run filters and conditions (None: neither).
        self._active: dict[int, tuple[EffectiveConfig, _Groups, Scope | None]] = {}

    async def evaluate(
        self,
        event: dict[str, Any],
        *,
        event_id: str,
        community_id: str,
        config: EffectiveConfig,
        room_version: str = "",
        origin: str = "",
        reference_hash: str = "",
        first_seen_ts: int | None = None,
        extra: dict[str, Any] | None = None,
        sender_verified: bool = True,
        sender_signatures_checked: bool = False,
        hellbanned: bool | None = None,
        effects: list[asyncio.Task[None]] | None = None,
    ) -> Verdict:
        """Judge one event for a community with its effective configuration.

        Filters see the event without ``unsigned`` and ``signatures`` (``covered_event``):
        a verdict must not depend on bytes that whoever asks first can change. With
        ``sender_verified`` false nothing is attributed to the sender (see
        ``FilterContext.sender_verified``) and the verdict says so.
        ``sender_signatures_checked``: see ``FilterContext.sender_signatures_checked``;
        ``hellbanned``: see ``FilterContext.hellbanned``.
        ``effects``: a list that receives the side effects filters started (a hellban's
        write, ``FilterContext.start_effect``) for the caller to wait for, alongside its
        own work, before it answers with the verdict; None: they are waited for here.

        Raises ``EvaluationUnavailable`` when a fail-secure filter's dependency failed:
        there is no verdict, and the event must be judged again later.
        """
        seen = now_ms() if first_seen_ts is None else first_seen_ts
        sender_signatures = _sender_signatures(event)
        event = covered_event(event)
        room_id = event.get("room_id")
        ctx = FilterContext(
            event=event,
            event_id=event_id,
            room_id=room_id if isinstance(room_id, str) else "",
            community_id=community_id,
            config=config,
            deps=self.deps,
            room_version=room_version,
            now_ms=seen,
            sender_verified=sender_verified,
            sender_signatures=sender_signatures,
            sender_signatures_checked=sender_signatures_checked,
            hellbanned=hellbanned,
        )
        if exporting():
            with _tracer.start_as_current_span("pipeline.evaluate"):
                content_class, harms, outcomes = await self._run(ctx)
        else:  # the worker's span for the request is current; a child would cost CPU only
            content_class, harms, outcomes = await self._run(ctx)
        if effects is not None:
            effects.extend(ctx.effects)
        elif ctx.effects:
            await asyncio.wait(ctx.effects)  # they log their own failures
        content_class, normal_harms = normalise(content_class, harms)
        if not sender_verified:
            outcomes.insert(0, FilterOutcome(SENDER_UNVERIFIED, ContentClass.NEUTRAL))
        return Verdict(
            event_id=event_id,
            content_class=content_class,
            harms=normal_harms,
            filters=tuple(outcomes),
            room_id=ctx.room_id,
            community_id=community_id,
            sender=ctx.sender,
            event_type=ctx.event_type,
            origin=origin,
            reference_hash=reference_hash,
            first_seen_ts=seen,
            extra=dict(extra or {}),
        )

    async def _run(self, ctx: FilterContext) -> tuple[ContentClass, list[str], list[FilterOutcome]]:
        if not is_user_id(ctx.event.get("sender")):
            # policyserv's rule: a sender that is not a user ID is refused outright.
            outcome = FilterOutcome(
                SENDER_CHECK, ContentClass.PROHIBITED, (SPAM, SPEC_NON_COMPLIANCE)
            )
            return outcome.content_class, list(outcome.harms), [outcome]

        content_class = ContentClass.NEUTRAL
        harms: list[str] = []
        outcomes: list[FilterOutcome] = []
        counted: list[FilterOutcome] = []  # without dry-run outcomes
        groups, scope = self._active_groups(ctx.config)
        for group, active in groups:
            if not active or content_class not in _RUNS_WHEN[group]:
                continue
            ctx.earlier = list(counted)
            if scope is not None:
                active = scope.select(active, ctx)
            for outcome in await self._run_group(active, ctx, scope):
                outcomes.append(outcome)
                if outcome.dry_run:
                    continue  # recorded only: it decides nothing
                counted.append(outcome)
                content_class = max(content_class, outcome.content_class)
                harms.extend(outcome.harms)
        return content_class, harms, outcomes

    def _active_groups(self, config: EffectiveConfig) -> tuple[_Groups, Scope | None]:
        """Each group with the filters ``config`` enables, in pipeline order, and the
        configuration's scope (``warden.policy.filter_scope``)."""
        hit = self._active.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1], hit[2]
        groups = [(g, [f for f in members if f.enabled(config)]) for g, members in self._groups]
        scope = compile_scope(config)
        if len(self._active) >= _ACTIVE_CACHE_SIZE:
            self._active.clear()  # configurations replaced since: cheap to work out again
        self._active[id(config)] = (config, groups, scope)
        return groups, scope

    async def _run_group(
        self, active: list[Filter], ctx: FilterContext, scope: Scope | None = None
    ) -> list[FilterOutcome]:
        """Run a group's filters; the outcomes in the group's order.

        Filters that wait on I/O run concurrently, each in its own task. The others
        (``waits_on_io = False``) run one after the other in this task: running them
        concurrently would change nothing but add a task, a timer and a trip round the
        event loop for each, which under load was most of the pipeline's cost.
        """
        dry = {f.name for f in active if scope.is_dry(f.name)} if scope is not None else ()
        waiting = [
            f for f in active if f.waits_on_io or (f.waits_on_io_sometimes and f.waits_for(ctx))
        ]
        if len(waiting) > 1:
            tasks = {
                f.name: asyncio.ensure_future(self._run_one(f, ctx, f.name in dry, waits=True))
                for f in waiting
            }
        else:
            tasks = {}
        outcomes: list[FilterOutcome] = []
        try:
            for flt in active:
                task = tasks.get(flt.name)
                outcomes.append(
                    await task
                    if task is not None
                    else await self._run_one(flt, ctx, flt.name in dry, waits=flt in waiting)
                )
        finally:
            for task in tasks.values():
                # Still running only if this evaluation was cancelled or given up on.
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: one given-up filter is reported, once
        return outcomes

    async def _run_one(
        self, flt: Filter, ctx: FilterContext, dry_run: bool = False, *, waits: bool | None = None
    ) -> FilterOutcome:
        if waits is None:
            waits = flt.waits_on_io or (flt.waits_on_io_sometimes and flt.waits_for(ctx))
        if dry_run:
            ctx = dry_context(ctx)
        start = time.perf_counter()
        error: str | None = None
        dependency = False
        limit = flt.timeout_seconds(ctx.deps, self.timeout_seconds) if waits else 0.0
        try:
            if waits:
                async with asyncio.timeout(limit):
                    result = await flt.check(ctx)
            else:
                # It never suspends, so no timer could interrupt it: spare the timer.
                result = await flt.check(ctx)
        except Exception as exc:  # a filter must never take the worker down
            if isinstance(exc, TimeoutError) and time.perf_counter() - start >= limit:
                error = f"timed out after {limit:g}s"
            else:
                error = f"{type(exc).__name__}: {exc}"[:500]
            # A filter that never waits has no timer: a TimeoutError out of it is its own
            # (a CPU budget, say), not a dependency's.
            dependency = is_dependency_failure(exc) and (waits or not isinstance(exc, TimeoutError))
            logger.warning(
                "filter failed",
                extra={
                    "filter": flt.name,
                    "event_id": ctx.event_id,
                    "error": error,
                    "dependency": dependency,
                },
            )
        fail_secure = error is not None and flt.fail_secure(ctx.config)
        if error is not None:
            result = FilterResult.prohibited(OTHER) if fail_secure else FilterResult.neutral()
            if dependency and fail_secure:
                result = FilterResult.neutral()  # never a verdict: the evaluation is given up
        duration_ms = (time.perf_counter() - start) * 1000
        content_class, harms = normalise(result.content_class, result.harms)
        outcome = new_outcome(flt.name, content_class, harms, error, duration_ms)
        if dry_run:
            # Recorded and counted, never a verdict: not even a given-up evaluation.
            return self._observe(mark_dry_run(outcome))
        self._observe(outcome)
        if dependency and fail_secure:
            assert error is not None
            raise EvaluationUnavailable(flt.name, error)
        return outcome

    def _observe(self, outcome: FilterOutcome) -> FilterOutcome:
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:  # metrics must not change a verdict
                logger.exception("outcome hook failed")
        return outcome

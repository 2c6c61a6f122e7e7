"""Answering evaluation requests: one verdict per event ID, forever, across all workers.

Requests (core NATS request/reply on ``EVALUATE_SUBJECT``, queue group
``FILTER_WORKERS_QUEUE``) that arrive together, that is every message NATS has buffered
by the time the event loop gets to them, are answered as one batch, so that Redis and
PostgreSQL round trips are paid per batch rather than per event:

1. Requests for the same event ID share one answer (gateway replicas may ask at once).
2. One Redis script looks at every event: its cached ``verdict(event_id)`` (reply it),
   or else claim ``evaluation_claim(event_id)`` (SET NX PX) for this worker, or else
   another worker holds the claim.
3. For the claimed events, one PostgreSQL query finds the verdicts Redis lost (sent
   with step 2's script, for every event of the batch, so that a new event waits for
   the slower of the two round trips rather than for both); the other events run
   through the pipeline concurrently and are committed through the group-commit writer
   (first writer wins).
4. One Redis script caches the committed verdicts and releases our claims. Then every
   request is replied to, and first-time verdicts are published to JetStream in the
   background (the verdict outbox guarantees their delivery).
5. An event claimed by another worker is waited for (Redis polled with backoff,
   PostgreSQL now and then), taking the claim over if it lapses (its holder died), up to
   a bound; then an error reply (the gateway answers 503 and the homeserver retries).
   Claims live a few seconds (``claim_ttl_seconds``, well under the wait) and the live
   holder keeps extending them while it works, so a dead worker's claims lapse and are
   taken over before its waiters give up.

When Redis cannot be reached (``warden.runtime.redis_outage``: skipped for a moment after
a failure, tried again after that) a batch is answered without it: PostgreSQL alone
decides. The claimed-event path runs as in step 3 (stored verdict, else judge and
commit), without claims, renewals or caching; events this worker is already judging are
waited for in process. Two workers may then judge one event at once: the verdict insert
keeps the first (``ON CONFLICT DO NOTHING``), and the other reads that one back and
replies it, so an event still has one verdict, forever. Only the winner's verdict is
published. Counted in ``warden_redis_fallbacks_total{use="claims"}``. The hellban
filters go on with this worker's own bans (``warden.filters.hellban_store``); filters
whose windows live in Redis (frequency, join and invite rates, off by default) cannot
judge then: their events are answered "try again" as for any dependency failure.

Failures are not verdicts: when a dependency fails (Redis or PostgreSQL unreachable or
too slow, or a fail-secure filter's dependency: ``EvaluationUnavailable``) the reply is
an error with ``retry_after_ms`` (the gateway answers 503 with ``Retry-After``), and
nothing about the event is stored, cached or published: the next ask judges it afresh.
The work done under claims has a deadline (``wait_seconds``, one timer per batch) and
PostgreSQL lookups a shorter one (``store_timeout_seconds``), so no claim is kept alive
for ever and a stalled database is answered "try again" rather than waited on.

Nothing is replied before it is committed in PostgreSQL, and Redis only ever holds
committed verdicts. The work runs in its own task, so it completes even when the
requester has given up waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from warden import redis_keys
from warden.bus.evaluation import (
    BadRequest,
    EvaluationRequest,
    decode_request,
    encode_error_reply,
)
from warden.bus.subjects import EVALUATE_SUBJECT, FILTER_WORKERS_QUEUE, is_streamed
from warden.matrix.third_party_invite import (
    is_third_party_invite,
    third_party_invite_token,
    verify_third_party_invite,
)
from warden.policy import slow_lane
from warden.policy.dependency_failures import EvaluationUnavailable, is_dependency_failure
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import Verdict
from warden.runtime.redis_outage import RedisOutage, is_redis_outage, server_of
from warden.settings import Settings
from warden.storage.room_state import get_third_party_invite
from warden.storage.verdicts import fetch_verdict_rows, get_verdict, lookup_verdicts
from warden.telemetry.tracing import caller_span, exporting, extract_context, tracer
from warden_filter_worker import metrics
from warden_filter_worker.community_config import CommunityConfigCache, UnknownCommunity
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

# PS_VERDICT_CACHE_SECONDS' default (declared once, in Settings): how long a verdict stays
# in Redis.
VERDICT_CACHE_SECONDS: int = Settings.model_fields["verdict_cache_seconds"].default
BODY_EXCERPT_CHARS = 500
# Poll the database every this many Redis polls while waiting on another worker (in case
# Redis lost the cached verdict).
_DB_POLL_EVERY = 8
# How long a batch's evaluations may take before those finished are answered without
# waiting for the rest, when none of the rest said it waits outside (``slow_lane``): a
# bound for the unforeseen (a slow database), as every other filter takes milliseconds.
SETTLE_EARLY_SECONDS = 0.25
# Sources whose events the gateway verified the sender's signatures of (``policy_api``).
_CHECKED = frozenset({"sign", "check"})
# What the gateway is told to wait before asking again after a dependency failed.
UNAVAILABLE_RETRY_AFTER_MS = 5000

# Per event, in one round trip for the whole batch: "is there a verdict, and if not, may
# I evaluate?", and whether its sender serves a hellban (read here, for the hellban
# prefilter, rather than in a round trip of its own). KEYS: n verdict keys, then the n
# claim keys, then the n hellban keys; ARGV: the claim TTL (ms), then one token per event.
# Returns per event the cached verdict, or 1 when this caller now holds the claim, or 0
# when another does; then per event 1 when its hellban key exists, else 0.
_LOOK = """
local n = #KEYS / 3
local out = {}
for i = 1, n do
    local cached = redis.call('get', KEYS[i])
    if cached then
        out[i] = cached
    elseif redis.call('set', KEYS[n + i], ARGV[i + 1], 'NX', 'PX', ARGV[1]) then
        out[i] = 1
    else
        out[i] = 0
    end
    out[n + i] = redis.call('exists', KEYS[2 * n + i])
end
return out
"""

# Cache committed verdicts and release our claims (only those our token still holds: a
# lapsed claim may be another worker's now), in one round trip. KEYS: n verdict keys,
# then claim keys; ARGV: the cache TTL (s), n, the n verdicts, then one token per claim.
_SETTLE = """
local n = tonumber(ARGV[2])
for i = 1, n do
    redis.call('set', KEYS[i], ARGV[2 + i], 'EX', ARGV[1])
end
for j = n + 1, #KEYS do
    if redis.call('get', KEYS[j]) == ARGV[2 + j] then
        redis.call('del', KEYS[j])
    end
end
return 0
"""

# Extend the claims this worker still holds (by token) while it works on them. KEYS: the
# claim keys; ARGV: the TTL (ms), then one token per claim.
_KEEP = """
for i = 1, #KEYS do
    if redis.call('get', KEYS[i]) == ARGV[i + 1] then
        redis.call('pexpire', KEYS[i], ARGV[1])
    end
end
return 0
"""

# The metric children, bound once rather than looked up per request.
_EVALUATIONS = {o: metrics.EVALUATIONS.labels(o) for o in metrics.OUTCOMES}
_EVALUATION_SECONDS = {o: metrics.EVALUATION_SECONDS.labels(o) for o in metrics.OUTCOMES}


@dataclasses.dataclass(slots=True)
class _Answer:
    """One event's reply body and how it was obtained (a metrics outcome)."""

    reply: bytes
    outcome: str
    cache: bool = False  # ``reply`` is a committed verdict to cache in Redis
    publish: Verdict | None = None  # a first-time verdict, to publish after replying
    message: bytes = b""  # its JSON with extras, as published


@dataclasses.dataclass(slots=True)
class _Event:
    """One event ID to answer: the request to judge it by, and that request's span."""

    request: EvaluationRequest
    span: Span | None = None
    # Whether the sender serves a hellban, as the look-up read it (None: not read).
    hellbanned: bool | None = None


@dataclasses.dataclass(eq=False, slots=True)
class _Job:
    """One NATS message being answered; ``done`` once its reply went out."""

    msg: Msg
    start: float
    span: Span
    done: bool = False


Deliver = Callable[[str, _Answer], Awaitable[None]]


def _failure(exc: Exception) -> _Answer:
    if is_dependency_failure(exc):
        return _unavailable(f"a dependency failed: {type(exc).__name__}")
    reply = encode_error_reply(f"evaluation failed: {type(exc).__name__}")
    return _Answer(reply, metrics.OUTCOME_ERROR)


def _unavailable(why: str) -> _Answer:
    """No verdict because a dependency failed: the event is judged again next time."""
    reply = encode_error_reply(
        f"cannot judge now, {why}", retry_after_ms=UNAVAILABLE_RETRY_AFTER_MS
    )
    return _Answer(reply, metrics.OUTCOME_UNAVAILABLE)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A read whose result nobody used (no event was claimed) must not be logged as an
    # unretrieved exception when it failed; a user of it sees the failure itself.
    if not task.cancelled():
        task.exception()


def _duplicate_outcome(outcome: str) -> str:
    # A second request for an event evaluated for the first is a wait on that
    # evaluation; one first_time per event keeps the metric a count of evaluations.
    return metrics.OUTCOME_WAITED if outcome == metrics.OUTCOME_FIRST_TIME else outcome


def _same_verdict(stored: Verdict, ours: Verdict) -> bool:
    if stored is ours:  # the writer hands back the very verdict it inserted
        return True
    # Read back from the table: no ``extra``, durations rounded as the JSON form does.
    rounded = tuple(
        dataclasses.replace(f, duration_ms=round(f.duration_ms, 3)) for f in ours.filters
    )
    return stored == dataclasses.replace(ours, filters=rounded, extra=stored.extra)


def _hellban_key(request: EvaluationRequest) -> str:
    """The hellban key of the request's sender in its community (the hellban filters')."""
    sender = request.event.get("sender")
    return redis_keys.hellban(request.community_id, sender if isinstance(sender, str) else "")


def _asked(event: _Event) -> tuple[str, str, str, str]:
    """What ``lookup_verdicts`` binds an unbound verdict to: the event as asked."""
    request = event.request
    room_id = request.event.get("room_id")
    return (
        request.event_id,
        request.reference_hash,
        room_id if isinstance(room_id, str) else "",
        request.community_id,
    )


def _in_span(span: Span | None) -> AbstractContextManager[object]:
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, end_on_exit=False)


class _EarlySettle:
    """When a batch's finished evaluations may be answered without waiting for the
    rest: ``future`` is set once all are done, or once some are and every one still
    running waits on an outside service (``slow_lane``)."""

    __slots__ = ("_count", "_finished", "_outside", "_running", "future")

    def __init__(self, count: int) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._count = count
        self._running = count
        self._outside: set[str] = set()  # running, and waiting outside
        self._finished: set[str] = set()

    def outside(self, event_id: str) -> None:
        """The evaluation of ``event_id`` waits outside (its slow-lane callback)."""
        if event_id not in self._finished and event_id not in self._outside:
            self._outside.add(event_id)
            self._check()

    def finished(self, event_id: str, _task: object) -> None:
        """The evaluation of ``event_id`` ended (its task's done callback)."""
        self._running -= 1
        self._finished.add(event_id)
        self._outside.discard(event_id)
        self._check()

    def _check(self) -> None:
        if self.future.done():
            return
        running = self._running
        if running == 0 or (running < self._count and running == len(self._outside)):
            self.future.set_result(None)


class EvaluationService:
    """Serves evaluation requests for one worker process."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        pipeline: Pipeline,
        configs: CommunityConfigCache,
        writer: GroupCommitWriter,
        publisher: VerdictPublisher,
        claim_ttl_seconds: float,
        wait_seconds: float,
        max_in_flight: int = 512,
        max_batch: int = 256,
        linger_seconds: float = 0.0,
        store_timeout_seconds: float = 5.0,
        settle_early_seconds: float = SETTLE_EARLY_SECONDS,
        verdict_log: bool = True,
        verdict_cache_seconds: int = VERDICT_CACHE_SECONDS,
    ) -> None:
        self._redis = redis
        # Whether neutral and allowed verdicts are published (``is_streamed``); the
        # writer's inserts must be given the same (``main`` builds both from the setting).
        self._verdict_log = verdict_log
        self._pool = pool
        self._pipeline = pipeline
        self._configs = configs
        self._writer = writer
        self._publisher = publisher
        self._claim_ttl_ms = int(claim_ttl_seconds * 1000)
        self._verdict_cache_seconds = verdict_cache_seconds
        self._wait_seconds = wait_seconds
        self._store_timeout = store_timeout_seconds
        self._settle_early = settle_early_seconds
        # Scripts run as EVALSHA (loaded on NOSCRIPT): one round trip each.
        self._look = redis.register_script(_LOOK)
        self._settle_claims = redis.register_script(_SETTLE)
        self._keep = redis.register_script(_KEEP)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_batch = max_batch
        self._pending: list[tuple[Msg, float]] = []
        self._linger = linger_seconds
        self._dispatch_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Batches whose only events still running wait outside (``slow_lane``): they are
        # not "being answered" for the linger below, which would otherwise hold every
        # batch while a media scan waits seconds on its classifier.
        self._outside: set[asyncio.Task[Any]] = set()
        self._nc: NATS | None = None
        self._subscription: Subscription | None = None
        self._redis_outage = RedisOutage("claims", server=server_of(redis))
        # Events this worker judges without Redis, by event ID: later asks wait on them.
        self._local_claims: dict[str, asyncio.Future[_Answer]] = {}

    # --- NATS wiring ---

    async def start(self, nc: NATS, subject: str = EVALUATE_SUBJECT) -> None:
        """Join the workers' queue group (on ``subject``: tests use one of their own)."""
        self._nc = nc
        self._subscription = await nc.subscribe(
            subject, queue=FILTER_WORKERS_QUEUE, cb=self._on_message
        )

    async def _on_message(self, msg: Msg) -> None:
        # The slots bound the requests in flight (NATS buffers the rest). Taking a free
        # one does not yield, so NATS hands over every message it has already buffered
        # before the batch starts at the end of this loop iteration.
        await self._slots.acquire()
        self._pending.append((msg, time.perf_counter()))
        if len(self._pending) >= self._max_batch:
            self._dispatch()
        elif self._dispatch_handle is None:
            loop = asyncio.get_running_loop()
            if self._linger and len(self._tasks) > len(self._outside):
                # A batch is being answered already: gather what arrives meanwhile a
                # moment longer. Under steady load batches would otherwise hold one or
                # two events, each paying its own Redis, PostgreSQL and JetStream round
                # trips and its own commit; idle, a request is dispatched at once.
                self._dispatch_handle = loop.call_later(self._linger, self._dispatch)
            else:
                self._dispatch_handle = loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()  # a full batch goes now, not at the timer
            self._dispatch_handle = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._outside.discard(task)

    def _waits_outside(self, batch: asyncio.Task[Any] | None) -> None:
        """``batch`` has answered what it could; the rest waits outside (or has been
        slow past the early-settle fallback): it no longer makes new batches linger."""
        if batch in self._tasks:  # a worker's batch (not a test's direct call)
            self._outside.add(batch)

    async def stop(self) -> None:
        """Stop taking requests, finish those in flight, flush writes and publishes."""
        if self._subscription is not None:
            try:
                await self._subscription.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # closing anyway; the rest must still run
                logger.warning("draining the subscription failed", extra={"error": str(exc)})
        self._dispatch()  # what the subscription handed over last
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._writer.close()
        await self._publisher.close()

    async def _run_batch(self, batch: list[tuple[Msg, float]]) -> None:
        metrics.EVALUATION_BATCH_SIZE.observe(len(batch))
        began = time.perf_counter()
        queued = metrics.EVALUATION_QUEUE_SECONDS.observe
        for _, arrived in batch:
            queued(began - arrived)
        if exporting():
            jobs = [
                _Job(
                    msg,
                    start,
                    _tracer.start_span(
                        "filter-worker.evaluate",
                        context=extract_context(msg.headers),
                        kind=SpanKind.SERVER,
                    ),
                )
                for msg, start in batch
            ]
        else:
            # Nobody would read a span of ours: the gateway's trace context, if it sent
            # one, still travels on to the verdict's publication.
            jobs = [_Job(msg, start, caller_span(msg.headers)) for msg, start in batch]
        by_event: dict[str, list[_Job]] = {}
        events: dict[str, _Event] = {}
        try:
            for job in jobs:
                try:
                    request = decode_request(job.msg.data, job.msg.headers)
                except BadRequest as exc:
                    await self._reply(job, encode_error_reply(str(exc)), metrics.OUTCOME_ERROR)
                    continue
                job.span.set_attribute("warden.event_id", request.event_id)
                same = by_event.get(request.event_id)
                if same is None:
                    by_event[request.event_id] = [job]
                    span = job.span if job.span is not trace.INVALID_SPAN else None
                    events[request.event_id] = _Event(request, span)
                else:
                    same.append(job)

            async def deliver(event_id: str, answer: _Answer) -> None:
                first, *duplicates = by_event[event_id]
                await self._reply(first, answer.reply, answer.outcome)
                for job in duplicates:
                    await self._reply(job, answer.reply, _duplicate_outcome(answer.outcome))

            await self._answer_events(events, deliver)
        except Exception:
            logger.exception("evaluation batch failed")
        finally:
            for job in jobs:
                if not job.done:  # only after an unexpected failure
                    await self._reply(
                        job, encode_error_reply("evaluation failed"), metrics.OUTCOME_ERROR
                    )

    async def _reply(self, job: _Job, reply: bytes, outcome: str) -> None:
        if job.done:  # one reply per message, and one slot back
            return
        job.done = True
        try:
            if job.msg.reply and self._nc is not None:
                # Not ``msg.respond``: it echoes the request's headers, which the gateway
                # does not read and both sides would encode and parse.
                await self._nc.publish(job.msg.reply, reply)
        except Exception:
            # Replying failed (NATS gone); the verdict, if any, is stored and cached.
            logger.exception("could not reply to an evaluation request")
        finally:
            job.span.set_attribute("warden.outcome", outcome)
            job.span.end()
            _EVALUATIONS[outcome].inc()
            _EVALUATION_SECONDS[outcome].observe(time.perf_counter() - job.start)
            self._slots.release()

    # --- the decision ---

    async def answer(self, request: EvaluationRequest) -> tuple[bytes, str]:
        """The reply body for a request and how it was obtained (a metrics outcome)."""
        return (await self.answer_many([request]))[0]

    async def answer_many(self, requests: Sequence[EvaluationRequest]) -> list[tuple[bytes, str]]:
        """Answer requests received together, as one batch; the replies in order.

        Requests for one event ID share its answer; after the first, a ``first_time``
        outcome reads ``waited``. First-time verdicts are published after this returns.
        """
        events: dict[str, _Event] = {}
        for request in requests:
            events.setdefault(request.event_id, _Event(request))
        answers: dict[str, _Answer] = {}

        async def deliver(event_id: str, answer: _Answer) -> None:
            answers[event_id] = answer

        await self._answer_events(events, deliver)
        out: list[tuple[bytes, str]] = []
        seen: set[str] = set()
        for request in requests:
            answer = answers[request.event_id]
            outcome = answer.outcome
            if request.event_id in seen:
                outcome = _duplicate_outcome(outcome)
            seen.add(request.event_id)
            out.append((answer.reply, outcome))
        return out

    async def _answer_events(self, events: dict[str, _Event], deliver: Deliver) -> None:
        """Deliver exactly one answer per event, each as soon as it is known."""
        if not events:
            return
        if self._redis_outage.skipping:
            await self._answer_without_redis(events, deliver)
            return
        tokens = {event_id: secrets.token_hex(8) for event_id in events}
        # PostgreSQL's rows for the batch are read while Redis answers, rather than after
        # it for the events we claim: one round trip less before a new event is judged.
        rows = self._read_rows(events)
        try:
            looks = await self._look_up(tokens, events)
        except Exception as exc:
            if is_redis_outage(exc):
                self._redis_outage.failed(exc)
                await self._answer_without_redis(events, deliver, rows)
                return
            logger.exception("looking up verdicts and claims failed")
            for event_id in events:
                await deliver(event_id, _failure(exc))
            return
        self._redis_outage.answered()
        claimed: dict[str, _Event] = {}
        waits: list[asyncio.Task[None]] = []
        for event_id, look in looks.items():
            if isinstance(look, bytes) and self._readable(event_id, look):
                await deliver(event_id, _Answer(look, metrics.OUTCOME_CACHED_REDIS))
            elif look == 1:
                claimed[event_id] = events[event_id]
            else:
                event = events[event_id]
                with _in_span(event.span):  # the task takes the context it is made in
                    waits.append(asyncio.create_task(self._wait(event, deliver)))
        try:
            if claimed:
                await self._settle(claimed, tokens, deliver, rows)
        finally:
            if waits:
                await asyncio.gather(*waits)

    async def _look_up(
        self, tokens: dict[str, str], events: dict[str, _Event]
    ) -> dict[str, bytes | int]:
        """Per event: its cached verdict, 1 (now claimed with its token) or 0 (held).
        Sets each event's ``hellbanned`` on the way."""
        keys = [redis_keys.verdict(e) for e in tokens]
        keys += [redis_keys.evaluation_claim(e) for e in tokens]
        keys += [_hellban_key(events[e].request) for e in tokens]
        answers = await self._look(keys=keys, args=[self._claim_ttl_ms, *tokens.values()])
        n = len(tokens)
        for event_id, banned in zip(tokens, answers[n:], strict=True):
            events[event_id].hellbanned = bool(banned)
        return dict(zip(tokens, answers[:n], strict=True))

    def _read_rows(self, events: dict[str, _Event]) -> asyncio.Task[list[asyncpg.Record]]:
        """Start reading the stored verdict rows of ``events`` (``fetch_verdict_rows``).

        Read before knowing which events this worker will claim: only claimed events use
        them (``_settle``). Reading rows an instant before the claim is safe: a verdict
        committed in between is by a worker whose claim lapsed, and our insert then loses
        to it and reads it back, as when it commits after the read.
        """

        async def read() -> list[asyncpg.Record]:
            async with asyncio.timeout(self._store_timeout):
                return await fetch_verdict_rows(self._pool, list(events))

        task = asyncio.create_task(read())
        task.add_done_callback(_retrieve)
        return task

    async def _answer_without_redis(
        self,
        events: dict[str, _Event],
        deliver: Deliver,
        rows: asyncio.Task[list[asyncpg.Record]] | None = None,
    ) -> None:
        """Redis is down: PostgreSQL decides (see the module docstring). ``rows``: the
        stored rows of ``events``, being read already (``_read_rows``)."""
        self._redis_outage.fell_back(len(events))
        loop = asyncio.get_running_loop()
        mine: dict[str, _Event] = {}
        joined: dict[str, asyncio.Future[_Answer]] = {}
        for event_id, event in events.items():
            running = self._local_claims.get(event_id)
            if running is None:
                mine[event_id] = event
                self._local_claims[event_id] = loop.create_future()
            else:
                joined[event_id] = running

        async def deliver_mine(event_id: str, answer: _Answer) -> None:
            future = self._local_claims.pop(event_id, None)
            if future is not None and not future.done():
                future.set_result(answer)
            await deliver(event_id, answer)

        async def settle_mine() -> None:
            try:
                await self._settle(mine, None, deliver_mine, rows)
            finally:
                for event_id in mine:  # only after an unexpected failure
                    future = self._local_claims.pop(event_id, None)
                    if future is not None and not future.done():
                        failed = encode_error_reply("evaluation failed")
                        future.set_result(_Answer(failed, metrics.OUTCOME_ERROR))

        async def join(event_id: str, future: asyncio.Future[_Answer]) -> None:
            # Bounded: the holder's work has the same deadline as ours.
            answer = await asyncio.shield(future)
            await deliver(event_id, _Answer(answer.reply, _duplicate_outcome(answer.outcome)))

        await asyncio.gather(settle_mine(), *(join(e, f) for e, f in joined.items()))

    async def _settle(
        self,
        claimed: dict[str, _Event],
        tokens: dict[str, str] | None,
        deliver: Deliver,
        rows: asyncio.Task[list[asyncpg.Record]] | None = None,
    ) -> None:
        """Answer the events we hold the claims of, then release the claims.

        ``tokens`` None: Redis is down, there are no claims (nothing renewed, cached or
        released); PostgreSQL's first-writer-wins insert keeps one verdict per event.
        ``rows``: the stored rows of (at least) these events, being read already
        (``_read_rows``); None: read them here.

        A batch is normally settled at once (one Redis round trip for its caches and
        claims). When every evaluation still running waits on an outside service (a media
        scan, a moderation model: ``slow_lane``), or some still runs
        ``settle_early_seconds`` after the batch's start, the finished ones are settled
        and answered then, and the rest as they finish: a slow event never holds the
        others' answers.
        """
        answers: dict[str, _Answer] = {}
        settled: set[str] = set()
        keeper = None
        if tokens is not None:
            keeper = asyncio.create_task(self._keep_claims({e: tokens[e] for e in claimed}))
        try:
            # Bounded, so that the claims kept alive meanwhile are released in time.
            async with asyncio.timeout(self._wait_seconds):
                # Redis may have lost a verdict PostgreSQL keeps (eviction, restart).
                # The same statement binds an imported room v1/v2 refusal, stored without
                # a reference hash, to the event asked about first.
                async with asyncio.timeout(self._store_timeout):
                    stored = await lookup_verdicts(
                        self._pool,
                        [_asked(e) for e in claimed.values()],
                        rows=None if rows is None else await rows,
                    )
                for event_id, verdict in stored.items():
                    answers[event_id] = _Answer(
                        verdict.to_json(), metrics.OUTCOME_CACHED_DB, cache=True
                    )
                fresh = [e for event_id, e in claimed.items() if event_id not in stored]
                if len(fresh) == 1:
                    outside = functools.partial(self._waits_outside, asyncio.current_task())
                    answer = await self._evaluate_watched(fresh[0], outside)
                    answers[fresh[0].request.event_id] = answer
                elif fresh:
                    await self._evaluate_many(claimed, fresh, answers, settled, tokens, deliver)
        except Exception as exc:
            if is_dependency_failure(exc):
                logger.warning(
                    "answering claimed events failed: a dependency failed",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            else:
                logger.exception("answering claimed events failed")
            for event_id in claimed:
                if event_id not in settled:
                    answers.setdefault(event_id, _failure(exc))
        finally:
            rest = {e: a for e, a in answers.items() if e not in settled}
            if keeper is not None:
                keeper.cancel()
        claims = None
        if keeper is not None and tokens is not None:
            claims = {e: tokens[e] for e in claimed if e not in settled}
        await self._deliver_cache_and_publish(claimed, rest, claims, deliver)

    async def _evaluate_many(
        self,
        claimed: dict[str, _Event],
        fresh: list[_Event],
        answers: dict[str, _Answer],
        settled: set[str],
        tokens: dict[str, str] | None,
        deliver: Deliver,
    ) -> None:
        """Evaluate ``fresh`` concurrently into ``answers``; settle early what finished
        when some evaluation is slow (its event IDs are added to ``settled``)."""
        gate = _EarlySettle(len(fresh))
        tasks: dict[asyncio.Task[_Answer], _Event] = {}
        for e in fresh:
            event_id = e.request.event_id
            task = asyncio.create_task(
                self._evaluate_watched(e, functools.partial(gate.outside, event_id))
            )
            task.add_done_callback(functools.partial(gate.finished, event_id))
            tasks[task] = e
        try:
            await asyncio.wait((gate.future,), timeout=self._settle_early)
            done = {t for t in tasks if t.done()}
            pending = set(tasks) - done
            while True:
                for finished in done:
                    answers[tasks[finished].request.event_id] = finished.result()
                if not pending:
                    return
                early = {e: a for e, a in answers.items() if e not in settled}
                if early:
                    settled.update(early)
                    claims = None if tokens is None else {e: tokens[e] for e in early}
                    await self._deliver_cache_and_publish(claimed, early, claims, deliver)
                self._waits_outside(asyncio.current_task())
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for running in tasks:
                running.cancel()  # still running only when the batch was given up on

    async def _deliver_cache_and_publish(
        self,
        events: dict[str, _Event],
        answers: dict[str, _Answer],
        claims: dict[str, str] | None,
        deliver: Deliver,
    ) -> None:
        """Answer, then cache the verdicts in Redis and release ``claims`` (None: no
        claims, Redis is down), then publish to JetStream.

        Answers first: each verdict is durable in PostgreSQL already. The Redis write
        serves later requests (a worker waiting on a claim finds the verdict a round trip
        later), so the requesters do not wait for it.
        """
        try:
            for event_id, answer in answers.items():
                await deliver(event_id, answer)
        finally:
            if claims is not None:
                await self._cache_and_release(
                    {e: a.reply for e, a in answers.items() if a.cache}, claims
                )
        for event_id, answer in answers.items():
            if answer.publish is not None:
                span = events[event_id].span
                self._publisher.publish_later(
                    answer.publish,
                    answer.message,
                    None if span is None else trace.set_span_in_context(span),
                )

    async def _keep_claims(self, claims: dict[str, str]) -> None:
        """Extend our claims every third of their TTL until cancelled (the work is done)."""
        keys = [redis_keys.evaluation_claim(e) for e in claims]
        args: list[Any] = [self._claim_ttl_ms, *claims.values()]
        while True:
            await asyncio.sleep(self._claim_ttl_ms / 3000)
            try:
                await self._keep(keys=keys, args=args)
            except Exception as exc:
                # The claims may lapse and another worker evaluate too: the first
                # commit wins, so that costs work, not consistency.
                logger.warning("could not extend evaluation claims", extra={"error": str(exc)})

    async def _cache_and_release(self, verdicts: dict[str, bytes], claims: dict[str, str]) -> None:
        keys = [redis_keys.verdict(e) for e in verdicts]
        keys += [redis_keys.evaluation_claim(e) for e in claims]
        args: list[Any] = [self._verdict_cache_seconds, len(verdicts), *verdicts.values()]
        args += claims.values()
        if self._redis_outage.skipping:
            return  # Redis failed a moment ago: the claims expire by themselves
        try:
            await self._settle_claims(keys=keys, args=args)
        except Exception as exc:
            # The verdicts are committed, so they are still replied: waiting workers find
            # them in PostgreSQL, and the claims expire by themselves.
            if is_redis_outage(exc):
                self._redis_outage.failed(exc)  # the next batches go without it at once
            logger.warning("could not cache verdicts or release claims", extra={"error": str(exc)})

    async def _evaluate_watched(self, event: _Event, mark: slow_lane.Mark) -> _Answer:
        """``_evaluate``, telling ``mark`` if it waits outside. The mark is set for the
        rest of the current task: an event's own task when a batch judges several, the
        batch's task when it judges one (which then ends with it)."""
        slow_lane.watch(mark)
        return await self._evaluate(event)

    async def _evaluate(self, event: _Event) -> _Answer:
        request = event.request
        with _in_span(event.span):
            try:
                return await self._judge_new(request, event.hellbanned)
            except UnknownCommunity:
                return _Answer(
                    encode_error_reply(f"unknown community {request.community_id!r}"),
                    metrics.OUTCOME_ERROR,
                )
            except EvaluationUnavailable as exc:
                # Nothing is stored, cached or published (not even the hellban
                # postfilter ran): the next ask judges the event again.
                logger.warning(
                    "evaluation given up: a filter's dependency failed",
                    extra={
                        "event_id": request.event_id,
                        "filter": exc.filter_name,
                        "error": exc.error,
                    },
                )
                return _unavailable(f"filter {exc.filter_name} could not run")
            except Exception as exc:
                logger.exception("evaluation failed", extra={"event_id": request.event_id})
                return _failure(exc)

    async def _judge_new(
        self, request: EvaluationRequest, hellbanned: bool | None = None
    ) -> _Answer:
        # No timer of its own here (one per event would cost the hot path): the
        # configuration read and the commit are bounded by ``_settle``'s deadline.
        config = await self._configs.get(request.community_id)
        extra: dict[str, Any] = {}
        if request.source:
            extra["source"] = request.source
        sender_verified = request.sender_signed or await self._vouched_by_invite(request.event)
        effects: list[asyncio.Task[None]] = []
        verdict = await self._pipeline.evaluate(
            request.event,
            event_id=request.event_id,
            community_id=request.community_id,
            config=config,
            room_version=request.room_version,
            origin=request.origin,
            reference_hash=request.reference_hash,
            extra=extra,
            sender_verified=sender_verified,
            # The gateway verified the sender's server's signatures before asking.
            sender_signatures_checked=request.sender_signed and request.source in _CHECKED,
            hellbanned=hellbanned,
            effects=effects,
        )
        content = request.event.get("content")
        body = content.get("body") if isinstance(content, dict) else None
        if verdict.prohibited and isinstance(body, str):
            # For the webhooks' audit message of a refusal, so they need not fetch the
            # event. Only refusals carry it: nothing reports neutral content.
            verdict = dataclasses.replace(
                verdict, extra={**verdict.extra, "body_excerpt": body[:BODY_EXCERPT_CHARS]}
            )
        # Given up on at the deadline, a write may still commit: the verdict is a real
        # one, the next ask finds it (first writer wins) and the outbox publishes it.
        winner = await self._writer.write(verdict)  # durable from here on
        if effects:
            # What the filters set going (a hellban's Redis write) ran during the commit
            # and is done before the answer, as if the filter had waited for it; waiting
            # in the filter held a refusal's commit, and its whole batch, a round trip.
            await asyncio.wait(effects)
        if not _same_verdict(winner, verdict):
            # A worker whose claim had lapsed committed first; its verdict stands. An
            # unbound one (asked about without a reference hash) is not cached, so that
            # the next ask binds it.
            return _Answer(
                winner.to_json(), metrics.OUTCOME_CACHED_DB, cache=bool(winner.reference_hash)
            )
        metrics.VERDICTS_BY_CLASS[verdict.content_class].inc()
        if verdict.harms:
            metrics.count_harms(verdict.harms)
        if verdict.prohibited or logger.isEnabledFor(logging.DEBUG):
            # Refusals at INFO, the rest at DEBUG: a line for every event signed was most
            # of the log's volume (tens of GB a day at a few thousand events a second)
            # and about 4 % of the worker's CPU; every verdict is in PostgreSQL, counted
            # in the metrics and, with the verdict log on, on JetStream.
            logger.log(
                logging.INFO if verdict.prohibited else logging.DEBUG,
                "verdict",
                extra={
                    "event_id": verdict.event_id,
                    "room_id": verdict.room_id,
                    "community_id": verdict.community_id,
                    # The server whose request was judged first (the gateway's line
                    # for each refused request is at DEBUG).
                    "origin": verdict.origin,
                    "class": verdict.content_class.label,
                    "harms": list(verdict.harms),
                },
            )
        if not is_streamed(verdict.content_class, verdict_log=self._verdict_log):
            # Stored as published (``insert_verdicts``): nothing to send.
            return _Answer(verdict.to_stored_json(), metrics.OUTCOME_FIRST_TIME, cache=True)
        # Serialised once: the reply and the cache hold what the table holds (no
        # extras), the JetStream message carries them.
        stored, message = verdict.to_json_pair()
        return _Answer(
            stored, metrics.OUTCOME_FIRST_TIME, cache=True, publish=verdict, message=message
        )

    async def _vouched_by_invite(self, event: dict[str, Any]) -> bool:
        """Whether a third-party invite the sender's server did not sign is vouched for
        by the room's learned ``m.room.third_party_invite`` (the auth rules' check of
        ``third_party_invite.signed``); only then is it attributed to its sender."""
        if not is_third_party_invite(event):
            return False
        token = third_party_invite_token(event)
        room_id = event.get("room_id")
        if token is None or not isinstance(room_id, str):
            return False
        invite = await get_third_party_invite(self._pool, room_id, token)
        return invite is not None and verify_third_party_invite(event, invite[0], invite[1])

    async def _wait(self, event: _Event, deliver: Deliver) -> None:
        """Wait for another worker's verdict; take the claim over if it lapses."""
        event_id = event.request.event_id
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._wait_seconds
            delay = 0.005
            polls = 0
            while loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
                polls += 1
                if polls % _DB_POLL_EVERY == 0:
                    async with asyncio.timeout(self._store_timeout):
                        stored = await get_verdict(self._pool, event_id)
                    # An unbound (imported) verdict is bound by the claim's holder first.
                    if stored is not None and stored.reference_hash:
                        await deliver(event_id, _Answer(stored.to_json(), metrics.OUTCOME_WAITED))
                        return
                if self._redis_outage.skipping:
                    await self._answer_without_redis({event_id: event}, deliver)
                    return
                token = secrets.token_hex(8)
                try:
                    look = (await self._look_up({event_id: token}, {event_id: event}))[event_id]
                except Exception as exc:
                    if not is_redis_outage(exc):
                        raise
                    # The holder may be judging still: whichever commits first wins.
                    self._redis_outage.failed(exc)
                    await self._answer_without_redis({event_id: event}, deliver)
                    return
                if isinstance(look, bytes) and self._readable(event_id, look):
                    await deliver(event_id, _Answer(look, metrics.OUTCOME_WAITED))
                    return
                if look == 1:  # the holder's claim lapsed (it died): ours now
                    await self._settle({event_id: event}, {event_id: token}, deliver)
                    return
        except Exception as exc:
            logger.exception("waiting for a verdict failed", extra={"event_id": event_id})
            await deliver(event_id, _failure(exc))
            return
        error = f"another worker is still evaluating {event_id} after {self._wait_seconds:g}s"
        await deliver(event_id, _Answer(encode_error_reply(error), metrics.OUTCOME_ERROR))

    @staticmethod
    def _readable(event_id: str, raw: bytes) -> bool:
        try:
            Verdict.from_json(raw)
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable cached verdict ignored", extra={"event_id": event_id})
            return False
        return True

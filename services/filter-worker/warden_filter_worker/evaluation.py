"""Answering evaluation requests: one verdict per event ID, forever, across all workers.

For each request (core NATS request/reply on ``EVALUATE_SUBJECT``, queue group
``FILTER_WORKERS_QUEUE``):

1. Redis ``verdict(event_id)`` holds the verdict → reply it.
2. PostgreSQL holds it → cache it in Redis, reply it.
3. Otherwise claim ``evaluation_claim(event_id)`` (SET NX PX). If another worker holds
   the claim, wait for its verdict to appear (Redis polled with backoff, PostgreSQL now
   and then), taking the claim over if it lapses (its holder died), up to a bound; then
   reply an error (the gateway answers 503 and the homeserver retries).
4. The claimer runs the pipeline, commits the verdict through the group-commit writer
   (first writer wins), caches the winner in Redis, publishes a first-time verdict to
   JetStream, releases the claim and replies.

Nothing is replied before it is committed in PostgreSQL, and Redis only ever holds
committed verdicts. The work runs in its own task, so it completes even when the
requester has given up waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from warden import redis_keys
from warden.bus.evaluation import (
    BadRequest,
    EvaluationRequest,
    decode_request,
    encode_error_reply,
)
from warden.bus.subjects import EVALUATE_SUBJECT, FILTER_WORKERS_QUEUE
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import Verdict
from warden.storage.verdicts import get_verdict
from warden.telemetry.tracing import extract_context, tracer
from warden_filter_worker import metrics
from warden_filter_worker.community_config import CommunityConfigCache, UnknownCommunity
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

VERDICT_CACHE_SECONDS = 24 * 3600
BODY_EXCERPT_CHARS = 500
# Poll the database every this many Redis polls while waiting on another worker (in case
# Redis lost the cached verdict).
_DB_POLL_EVERY = 8

# One round trip for "is there a verdict, and if not, may I evaluate?": returns the
# cached verdict, or 1 when this caller now holds the claim, or 0 when another does.
_VERDICT_OR_CLAIM = """
local cached = redis.call('get', KEYS[1])
if cached then
    return cached
end
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""

_RELEASE_CLAIM = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class WaitTimeout(RuntimeError):
    """Another worker's evaluation did not finish within the wait bound."""


def _same_verdict(stored: Verdict, ours: Verdict) -> bool:
    # The table keeps no ``extra``; everything else round-trips exactly.
    a, b = stored.to_dict(), ours.to_dict()
    a.pop("extra", None)
    b.pop("extra", None)
    return a == b


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
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._pipeline = pipeline
        self._configs = configs
        self._writer = writer
        self._publisher = publisher
        self._claim_ttl_ms = int(claim_ttl_seconds * 1000)
        self._wait_seconds = wait_seconds
        self._release_claim = redis.register_script(_RELEASE_CLAIM)
        self._verdict_or_claim = redis.register_script(_VERDICT_OR_CLAIM)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None

    # --- NATS wiring ---

    async def start(self, nc: NATS) -> None:
        """Join the workers' queue group."""

        async def on_message(msg: Msg) -> None:
            # Hand each request to its own task so requests run concurrently; the slots
            # bound the work in flight (NATS buffers the rest).
            await self._slots.acquire()
            task = asyncio.create_task(self._handle(msg))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        self._subscription = await nc.subscribe(
            EVALUATE_SUBJECT, queue=FILTER_WORKERS_QUEUE, cb=on_message
        )

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def stop(self) -> None:
        """Stop taking requests, finish those in flight, flush writes and publishes."""
        if self._subscription is not None:
            try:
                await self._subscription.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # closing anyway; the rest must still run
                logger.warning("draining the subscription failed", extra={"error": str(exc)})
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._writer.close()
        await self._publisher.close()

    async def _handle(self, msg: Msg) -> None:
        start = time.perf_counter()
        outcome = metrics.OUTCOME_ERROR
        try:
            parent = extract_context(msg.headers)
            with _tracer.start_as_current_span(
                "filter-worker.evaluate", context=parent, kind=SpanKind.SERVER
            ) as span:
                try:
                    request = decode_request(msg.data, msg.headers)
                except BadRequest as exc:
                    reply = encode_error_reply(str(exc))
                else:
                    span.set_attribute("warden.event_id", request.event_id)
                    reply, outcome = await self.answer(request)
                span.set_attribute("warden.outcome", outcome)
            if msg.reply:
                await msg.respond(reply)
        except Exception:
            # Replying failed (NATS gone); the verdict, if any, is stored and cached.
            logger.exception("could not reply to an evaluation request")
        finally:
            metrics.EVALUATIONS.labels(outcome).inc()
            metrics.EVALUATION_SECONDS.labels(outcome).observe(time.perf_counter() - start)

    # --- the decision ---

    async def answer(self, request: EvaluationRequest) -> tuple[bytes, str]:
        """The reply body for a request and how it was obtained (a metrics outcome)."""
        try:
            verdict, outcome = await self.judge(request)
        except UnknownCommunity:
            return (
                encode_error_reply(f"unknown community {request.community_id!r}"),
                metrics.OUTCOME_ERROR,
            )
        except WaitTimeout as exc:
            return encode_error_reply(str(exc)), metrics.OUTCOME_ERROR
        except Exception as exc:
            logger.exception("evaluation failed", extra={"event_id": request.event_id})
            return encode_error_reply(
                f"evaluation failed: {type(exc).__name__}"
            ), metrics.OUTCOME_ERROR
        return verdict.to_json(), outcome

    async def judge(self, request: EvaluationRequest) -> tuple[Verdict, str]:
        """The event's one verdict, evaluating it only if no worker has yet."""
        event_id = request.event_id
        verdict_key = redis_keys.verdict(event_id)
        claim_key = redis_keys.evaluation_claim(event_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_seconds
        delay = 0.005
        polls = 0
        first_look = True
        while True:
            token = secrets.token_hex(8)
            answer = await self._verdict_or_claim(
                keys=[verdict_key, claim_key], args=[token, self._claim_ttl_ms]
            )
            if isinstance(answer, bytes):
                cached = self._decode_cached(event_id, answer)
                if cached is not None:
                    outcome = metrics.OUTCOME_CACHED_REDIS if first_look else metrics.OUTCOME_WAITED
                    return cached, outcome
            elif answer == 1:
                try:
                    # Redis may have lost a verdict PostgreSQL keeps (eviction, restart).
                    stored = await get_verdict(self._pool, event_id)
                    if stored is not None:
                        await self._cache(stored)
                        return stored, metrics.OUTCOME_CACHED_DB
                    return await self._evaluate(request)
                finally:
                    await self._release(claim_key, token)
            first_look = False
            if loop.time() >= deadline:
                raise WaitTimeout(
                    f"another worker is still evaluating {event_id} after {self._wait_seconds:g}s"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
            polls += 1
            if polls % _DB_POLL_EVERY == 0:
                stored = await get_verdict(self._pool, event_id)
                if stored is not None:
                    return stored, metrics.OUTCOME_WAITED

    async def _evaluate(self, request: EvaluationRequest) -> tuple[Verdict, str]:
        config = await self._configs.get(request.community_id)
        extra: dict[str, Any] = {}
        if request.source:
            extra["source"] = request.source
        verdict = await self._pipeline.evaluate(
            request.event,
            event_id=request.event_id,
            community_id=request.community_id,
            config=config,
            room_version=request.room_version,
            origin=request.origin,
            reference_hash=request.reference_hash,
            extra=extra,
        )
        content = request.event.get("content")
        body = content.get("body") if isinstance(content, dict) else None
        if verdict.prohibited and isinstance(body, str):
            # For the webhooks' audit message of a refusal, so they need not fetch the
            # event. Only refusals carry it: nothing reports neutral content.
            verdict = dataclasses.replace(
                verdict, extra={**verdict.extra, "body_excerpt": body[:BODY_EXCERPT_CHARS]}
            )
        winner = await self._writer.write(verdict)  # durable from here on
        await self._cache(winner)
        if not _same_verdict(winner, verdict):
            # A worker whose claim had lapsed committed first; its verdict stands.
            return winner, metrics.OUTCOME_CACHED_DB
        metrics.VERDICTS.labels(verdict.content_class.label).inc()
        logger.info(
            "verdict",
            extra={
                "event_id": verdict.event_id,
                "room_id": verdict.room_id,
                "community_id": verdict.community_id,
                "class": verdict.content_class.label,
                "harms": list(verdict.harms),
            },
        )
        await self._publisher.publish(verdict)
        return winner, metrics.OUTCOME_FIRST_TIME

    @staticmethod
    def _decode_cached(event_id: str, raw: bytes) -> Verdict | None:
        try:
            return Verdict.from_json(raw)
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable cached verdict ignored", extra={"event_id": event_id})
            return None

    async def _cache(self, verdict: Verdict) -> None:
        await self._redis.set(
            redis_keys.verdict(verdict.event_id), verdict.to_json(), ex=VERDICT_CACHE_SECONDS
        )

    async def _release(self, claim_key: str, token: str) -> None:
        try:
            await self._release_claim(keys=[claim_key], args=[token])
        except Exception as exc:  # it expires by itself
            logger.warning("could not release a claim", extra={"error": str(exc)})

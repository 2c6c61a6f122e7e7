"""One verdict per event, as seen from the gateway.

Lookup order for an event ID:

1. an in-process LRU (event ID -> verdict, and the policy signature once made: ed25519
   is deterministic, so signing the same bytes again would give the same signature);
2. a NATS request on ``EVALUATE_SUBJECT`` (``warden.bus.request_reply``), answered by
   one filter worker of the queue group. The workers make sure an event is evaluated
   once across all of them, and answer a verdict already given from Redis
   (``redis_keys.verdict``) in one round trip.

The gateway does not look in Redis itself: for a first-time event (the costly case)
that lookup always missed and cost a round trip before the NATS request; a verdict
another replica obtained costs one NATS request to a worker instead, once per replica.

Concurrent requests for one event ID in this process share a single lookup
(single-flight). The lookup runs in its own task, so it carries on when the HTTP
request that started it goes away; whoever asks next finds the verdict in the caches.

A worker that dies (or stops) while judging takes the request with it. So when no answer
came within the claim TTL (``PS_EVALUATION_CLAIM_TTL_SECONDS``, when shorter than the
timeout), the lookup asks once more, within what is left of the timeout: the queue group
hands the request to a worker, which answers from the verdict cache, waits for a live
holder's verdict, or takes over the dead holder's claim (lapsed by then: it lives the TTL
unrenewed) and judges the event (``warden_verdict_reasks_total``). An evaluation that is
merely slow costs one more request, which waits for it.

When no worker answers within ``PS_VERDICT_TIMEOUT_SECONDS`` (or none is subscribed,
or one answers ``{"error": ...}``, for instance because a dependency failed) the lookup
fails with ``TemporarilyUnavailable`` (503 with ``Retry-After``) and nothing is cached:
the gateway never signs what was not judged, and the next ask asks the workers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import NamedTuple

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, get_current_span

from warden.bus.evaluation import EvaluationRequest, WorkerError, decode_reply
from warden.bus.request_reply import Requester
from warden.bus.subjects import EVALUATE_SUBJECT
from warden.policy.verdict import Verdict
from warden.telemetry.tracing import exporting, inject_headers, tracer
from warden_gateway.errors import TemporarilyUnavailable
from warden_gateway.metrics import (
    VERDICT_CACHE,
    VERDICT_FAILURES,
    VERDICT_REASKS,
    CacheLayer,
    VerdictFailure,
)

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

DEFAULT_MEMORY_SIZE = 50_000
_CACHE_HITS = {layer: VERDICT_CACHE.labels(layer) for layer in CacheLayer}
_MEMORY_HITS = _CACHE_HITS[CacheLayer.MEMORY]
# After a timeout the evaluation is still running; a retry a moment later usually finds
# the verdict in Redis.
RETRY_AFTER_TIMEOUT_SECONDS = 2
RETRY_AFTER_NO_WORKER_SECONDS = 5


class CachedVerdict(NamedTuple):
    """What the gateway keeps of a verdict (only what ``/sign`` needs), with our
    signature once we have made it."""

    prohibited: bool
    harms: tuple[str, ...]
    reference_hash: str  # of the event the verdict was given for
    signature: str | None = None
    # A refusal first asked for by the sender's own server: that server's name (the
    # moderator did not redact it; another server asking means it must). Else "".
    sender_server_first: str = ""


def _sender_server_first(verdict: Verdict) -> str:
    """The sender's server, if it was the first to ask about this refused event."""
    if not verdict.prohibited:
        return ""
    _, sep, server = verdict.sender.partition(":")
    return server if sep and server == verdict.origin else ""


class VerdictSource:
    """Find the verdict for an event: memory, then a filter worker."""

    def __init__(
        self,
        nc: NATS,
        *,
        timeout_seconds: float,
        subject: str = EVALUATE_SUBJECT,
        memory_size: int = DEFAULT_MEMORY_SIZE,
        reask_after_seconds: float | None = None,
    ) -> None:
        self._requests = Requester(nc)
        self._timeout = timeout_seconds
        # The first request's wait: the whole timeout, or up to the re-ask.
        self._first_wait = timeout_seconds
        if reask_after_seconds is not None and reask_after_seconds < timeout_seconds:
            self._first_wait = reask_after_seconds
        self._subject = subject
        self._memory_size = memory_size
        # Plain tuples of strings and a bool, which the garbage collector stops tracking
        # (it does not untrack tuple subclasses): as objects, the tens of thousands of
        # entries made each full collection stall the gateway for over 100 ms under load.
        self._memory: OrderedDict[str, tuple[bool, tuple[str, ...], str, str | None, str]] = (
            OrderedDict()
        )
        self._inflight: dict[str, asyncio.Task[CachedVerdict]] = {}

    def cached(self, event_id: str) -> CachedVerdict | None:
        """The in-process entry for ``event_id``, if any (no I/O, no metrics)."""
        entry = self._memory.get(event_id)
        return None if entry is None else CachedVerdict._make(entry)

    def remember_signature(self, event_id: str, signature: str) -> None:
        """Keep our signature with the cached verdict, so repeats need no signing."""
        entry = self._memory.get(event_id)
        if entry is not None and entry[3] is None:
            self._memory[event_id] = (*entry[:3], signature, *entry[4:])

    def remembered(self, event_id: str) -> CachedVerdict | None:
        """The in-process verdict for ``event_id``, counted as a memory hit, if any.

        What ``get`` answers first, without building an ``EvaluationRequest``: a spam
        wave's repeats are all memory hits.
        """
        entry = self._memory.get(event_id)
        if entry is None:
            return None
        self._memory.move_to_end(event_id)
        _MEMORY_HITS.inc()
        return CachedVerdict._make(entry)

    async def get(self, request: EvaluationRequest) -> CachedVerdict:
        """The verdict for ``request.event_id``.

        Raises ``TemporarilyUnavailable`` when no verdict could be obtained.
        """
        entry = self.remembered(request.event_id)
        if entry is not None:
            return entry
        task = self._inflight.get(request.event_id)
        if task is None:
            task = asyncio.create_task(self._lookup(request), name="verdict-lookup")
            self._inflight[request.event_id] = task
            task.add_done_callback(lambda done: self._finished(request.event_id, done))
        else:
            _CACHE_HITS[CacheLayer.IN_FLIGHT].inc()
        # Shielded: a caller that goes away must not cancel the lookup for the others,
        # nor the caching of its result.
        return await asyncio.shield(task)

    def _finished(self, event_id: str, task: asyncio.Task[CachedVerdict]) -> None:
        if self._inflight.get(event_id) is task:
            del self._inflight[event_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged

    def _remember(self, event_id: str, entry: CachedVerdict) -> None:
        self._memory[event_id] = (*entry,)
        self._memory.move_to_end(event_id)
        while len(self._memory) > self._memory_size:
            self._memory.popitem(last=False)

    async def _lookup(self, request: EvaluationRequest) -> CachedVerdict:
        verdict = await self._ask_workers(request)
        _CACHE_HITS[CacheLayer.NATS].inc()
        entry = CachedVerdict(
            verdict.prohibited,
            tuple(verdict.harms),
            verdict.reference_hash,
            sender_server_first=_sender_server_first(verdict),
        )
        self._remember(request.event_id, entry)
        return entry

    async def _ask_workers(self, request: EvaluationRequest) -> Verdict:
        if exporting() and get_current_span().is_recording():
            with _tracer.start_as_current_span("policy.evaluate", kind=SpanKind.CLIENT):
                headers = inject_headers(request.headers())
        else:
            # Nobody would read the span (no exporter, or a trace not sampled): the
            # current trace context, if any, travels on as it is.
            headers = inject_headers(request.headers())
        try:
            msg = await self._request(request, headers)
        except nats.errors.NoRespondersError:
            raise self._failure(
                VerdictFailure.NO_RESPONDERS,
                "No filter worker is available to judge this event; try again later",
                RETRY_AFTER_NO_WORKER_SECONDS,
            ) from None
        except nats.errors.TimeoutError:
            raise self._failure(
                VerdictFailure.TIMEOUT,
                f"No verdict for this event within {self._timeout:g} s; it is still being "
                "judged, try again shortly",
                RETRY_AFTER_TIMEOUT_SECONDS,
            ) from None
        except (nats.errors.Error, OSError) as exc:
            logger.warning("NATS request failed", extra={"error": str(exc)})
            raise self._failure(
                VerdictFailure.NATS_ERROR,
                "The policy server cannot reach its filter workers; try again later",
                RETRY_AFTER_NO_WORKER_SECONDS,
            ) from None
        return self._parse_reply(request, msg.data)

    async def _request(self, request: EvaluationRequest, headers: dict[str, str]) -> Msg:
        """Ask the workers; ask again once if no answer came within the claim TTL."""
        try:
            return await self._requests.request(
                self._subject, request.pdu, timeout_seconds=self._first_wait, headers=headers
            )
        except nats.errors.TimeoutError:
            if self._first_wait >= self._timeout:
                raise
        # The worker that took the request may have died holding the event's claim.
        VERDICT_REASKS.inc()
        return await self._requests.request(
            self._subject,
            request.pdu,
            timeout_seconds=self._timeout - self._first_wait,
            headers=headers,
        )

    def _parse_reply(self, request: EvaluationRequest, data: bytes) -> Verdict:
        try:
            verdict = decode_reply(data, with_filters=False)
        except WorkerError as exc:
            logger.warning(
                "filter worker could not judge event",
                extra={"event_id": request.event_id, "error": str(exc)},
            )
            if exc.retry_after_ms is not None:
                # A dependency failed: no verdict was stored, asking again judges afresh.
                raise self._failure(
                    VerdictFailure.DEPENDENCY,
                    "The policy server cannot judge this event right now; try again later",
                    max(1, min(exc.retry_after_ms, 60_000) // 1000),
                ) from None
            raise self._failure(
                VerdictFailure.WORKER_ERROR,
                "The policy server could not judge this event right now; try again later",
                RETRY_AFTER_TIMEOUT_SECONDS,
            ) from None
        except ValueError as exc:
            logger.error(
                "unreadable verdict from filter worker",
                extra={"event_id": request.event_id, "error": str(exc)},
            )
            raise self._failure(
                VerdictFailure.BAD_REPLY,
                "The policy server could not judge this event right now; try again later",
                RETRY_AFTER_TIMEOUT_SECONDS,
            ) from None
        if verdict.event_id != request.event_id:
            logger.error(
                "filter worker answered for another event",
                extra={"event_id": request.event_id, "answered": verdict.event_id},
            )
            raise self._failure(
                VerdictFailure.BAD_REPLY,
                "The policy server could not judge this event right now; try again later",
                RETRY_AFTER_TIMEOUT_SECONDS,
            )
        return verdict

    @staticmethod
    def _failure(reason: VerdictFailure, message: str, retry_after: int) -> TemporarilyUnavailable:
        VERDICT_FAILURES.labels(reason).inc()
        return TemporarilyUnavailable(message, retry_after_seconds=retry_after)

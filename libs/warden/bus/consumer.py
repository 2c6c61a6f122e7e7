"""A durable JetStream pull consumer loop that acknowledges only after the side effect.

Each message goes to a handler, which does its side effect (a redaction, a webhook
POST) and returns what to do with the message:

- ``ACK``: the side effect happened, or was decided against (skipped, permanently
  failed). The message is acknowledged and never comes back.
- ``Retry(delay)``: a temporary failure. The message is negatively acknowledged with
  that delay, so JetStream redelivers it (to this or another replica) later.

A handler that raises is treated as ``Retry`` with exponential backoff, and counted in
``warden_bus_handler_failures_total{consumer,reason}``: a dependency that is away
(``is_dependency_failure``: a PostgreSQL restart fails every message in flight) is one
warning line, anything else an error with its traceback. While a handler
runs, the loop tells JetStream the message is still in progress, so a slow side effect
is not redelivered elsewhere meanwhile. If the process dies before the ack, JetStream
redelivers after the consumer's ``ack_wait``: delivery is at least once, and handlers
must make a repeated side effect harmless (transaction IDs, idempotency keys, a record
of what was done).

On stop the loop fetches nothing more, lets in-flight handlers finish (bounded), and
leaves anything unfinished unacknowledged for redelivery.

Deliveries are bounded (``max_deliveries``, ``PS_BUS_MAX_DELIVERIES``): a message whose
handler still fails (or runs past ``handler_timeout``) at its last delivery, or that
arrives once more after earlier deliveries never settled (the process handling it died
or wedged, review H3), is dead-lettered: terminated (JetStream never hands it out
again), counted in ``warden_bus_dead_lettered_total{consumer}`` and logged with its
stream sequence, so one poison message cannot crash-loop every replica. The message
itself stays in the stream until its age limit, for an operator to inspect. The check
uses the delivery count JetStream reports, so it holds for consumers created before it
existed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo
from nats.js.errors import APIError, NotFoundError
from prometheus_client import Counter, Gauge

from warden.policy.dependency_failures import is_dependency_failure
from warden.telemetry.tracing import extract_context, tracer

if TYPE_CHECKING:
    from warden.runtime.service import ServiceRuntime

logger = logging.getLogger(__name__)

# Upper bound of any redelivery delay the loop computes itself.
MAX_BACKOFF_SECONDS = 300.0
# Deliveries of one message before it is dead-lettered (PS_BUS_MAX_DELIVERIES).
DEFAULT_MAX_DELIVERIES = 10
# Bound on one handler run; every handler's own calls have shorter timeouts (30 s HTTP,
# 10 s verdicts), so only a hung await reaches it. It then counts as a failed delivery.
HANDLER_TIMEOUT_SECONDS = 300.0

DEAD_LETTERED = Counter(
    "warden_bus_dead_lettered_total",
    "JetStream messages given up after too many deliveries (terminated, never "
    "redelivered), by durable consumer.",
    ["consumer"],
)

HANDLER_FAILURES = Counter(
    "warden_bus_handler_failures_total",
    "Handler runs that raised (the message is redelivered later, or dead-lettered at its"
    " last delivery), by consumer and reason: dependency (PostgreSQL, Redis or a"
    " connection refused, cut or timed out; logged as a warning without a traceback),"
    " timeout (past the handler's bound) or error (anything else, likely a bug; logged as"
    " an error with its traceback).",
    ["consumer", "reason"],
)

# What a dead-lettered message's log line says of its last failed run, by reason.
_RETRY_REASONS = {
    "timeout": "handler timeout",
    "dependency": "dependency unavailable",
    "error": "handler error",
}

REDELIVERIES = Counter(
    "warden_bus_redeliveries_total",
    "JetStream messages handed to this process again after an earlier delivery (a retry,"
    " a handler that failed, or a replica that died before acknowledging), by consumer.",
    ["consumer"],
)
# Consumer lag, as JetStream reports it for the whole durable consumer (every replica
# reports the same numbers: aggregate with max, not sum).
CONSUMER_PENDING = Gauge(
    "warden_bus_consumer_pending",
    "Messages in the stream not yet delivered to the durable consumer (num_pending),"
    " polled every 15 s by each replica.",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "warden_bus_consumer_ack_pending",
    "Messages delivered to the durable consumer and not yet acknowledged (num_ack_pending).",
    ["consumer"],
)
CONSUMER_REDELIVERED = Gauge(
    "warden_bus_consumer_redelivered",
    "Messages of the durable consumer delivered more than once and not yet acknowledged"
    " (num_redelivered).",
    ["consumer"],
)
# How often each replica asks JetStream for its consumer's numbers: one small request.
LAG_POLL_SECONDS = 15.0

_jitter = random.SystemRandom()
_tracer = tracer(__name__)


@dataclass(frozen=True)
class Ack:
    """The message is finished with: acknowledge it."""


@dataclass(frozen=True)
class Retry:
    """A temporary failure: redeliver the message after ``delay`` seconds."""

    delay: float
    reason: str = ""


ACK = Ack()
Disposition = Ack | Retry


@dataclass(frozen=True)
class Delivery:
    """One message as the handler sees it."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    attempt: int  # 1 on the first delivery; grows with every redelivery
    stream_sequence: int


Handler = Callable[[Delivery], Awaitable[Disposition]]


def backoff_delay(attempt: int, base: float, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """``base * 2**(attempt-1)``, capped, with ±20% jitter so replicas do not march in step."""
    raw = min(cap, base * (2 ** max(0, min(attempt - 1, 30))))
    jittered: float = raw * _jitter.uniform(0.8, 1.2)
    return max(0.0, min(cap, jittered))


async def ensure_durable_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig
) -> ConsumerInfo:
    """Create the durable consumer if it does not exist; return its current info.

    An existing consumer is left as it is (an operator may have tuned it, and JetStream
    refuses to change most fields in place).
    """
    durable = config.durable_name
    assert durable, "a durable consumer needs a name"
    info: ConsumerInfo
    try:
        info = await js.consumer_info(stream, durable)
        return info
    except NotFoundError:
        pass
    try:
        info = await js.add_consumer(stream, config)
    except APIError:
        # Another replica created it between our two calls.
        info = await js.consumer_info(stream, durable)
    return info


class PullConsumer:
    """Runs a handler over a durable pull consumer with bounded concurrency."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        stream: str,
        durable: str,
        handler: Handler,
        max_in_flight: int,
        retry_base_seconds: float = 1.0,
        fetch_timeout: float = 1.0,
        drain_timeout: float = 20.0,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        handler_timeout: float = HANDLER_TIMEOUT_SECONDS,
        lag_poll_seconds: float = LAG_POLL_SECONDS,
    ) -> None:
        self._js = js
        self.stream = stream
        self.durable = durable
        self._handler = handler
        self._max_in_flight = max(1, max_in_flight)
        self._retry_base = retry_base_seconds
        self._fetch_timeout = fetch_timeout
        self._drain_timeout = drain_timeout
        self._max_deliveries = max(1, max_deliveries)
        self._handler_timeout = handler_timeout
        self._ack_wait = 30.0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._lag_poll = lag_poll_seconds
        self._redeliveries = REDELIVERIES.labels(durable)

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and handle messages until ``stopping`` is set, then drain."""
        info = await self._js.consumer_info(self.stream, self.durable)
        if info.config.ack_wait:
            self._ack_wait = float(info.config.ack_wait)
        sub = await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        logger.info(
            "consuming",
            extra={"event": "consumer_started", "stream": self.stream, "consumer": self.durable},
        )
        stop_task = asyncio.create_task(stopping.wait())
        lag_task = asyncio.create_task(self._poll_lag(), name=f"{self.durable}-lag")
        try:
            while not stopping.is_set():
                free = self._max_in_flight - len(self._in_flight)
                if free <= 0:
                    await asyncio.wait(
                        [*self._in_flight, stop_task], return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                try:
                    msgs = await sub.fetch(batch=free, timeout=self._fetch_timeout)
                except TimeoutError:  # nothing to fetch (nats' TimeoutError subclasses it)
                    continue
                except nats.errors.Error as exc:
                    # Disconnected or a JetStream hiccup: nats-py reconnects by itself.
                    logger.warning(
                        "fetch failed; retrying",
                        extra={"event": "consumer_fetch_failed", "error": str(exc)},
                    )
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._process(msg))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
        finally:
            stop_task.cancel()
            lag_task.cancel()
            await self._drain()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def poll_lag_once(self) -> None:
        """Ask JetStream for the consumer's pending counts and set the lag gauges."""
        info = await self._js.consumer_info(self.stream, self.durable)
        CONSUMER_PENDING.labels(self.durable).set(info.num_pending or 0)
        CONSUMER_ACK_PENDING.labels(self.durable).set(info.num_ack_pending or 0)
        CONSUMER_REDELIVERED.labels(self.durable).set(info.num_redelivered or 0)

    async def _poll_lag(self) -> None:
        while True:
            try:
                await self.poll_lag_once()
            except Exception as exc:
                # NATS away for a moment: the gauges keep their last values (the
                # readiness check and warden_dependency_up report the outage itself).
                logger.debug("consumer_info failed", extra={"error": str(exc)})
            await asyncio.sleep(self._lag_poll)

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        pending = set(self._in_flight)
        logger.info("draining in-flight messages", extra={"in_flight": len(pending)})
        _, still = await asyncio.wait(pending, timeout=self._drain_timeout)
        for task in still:
            task.cancel()  # left unacknowledged: JetStream redelivers it
        if still:
            await asyncio.gather(*still, return_exceptions=True)
            logger.warning(
                "drain timed out; unfinished messages will be redelivered",
                extra={"event": "consumer_drain_timeout", "unfinished": len(still)},
            )

    async def _process(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            attempt=int(meta.num_delivered or 1),
            stream_sequence=int(meta.sequence.stream if meta.sequence else 0),
        )
        if delivery.attempt > 1:
            self._redeliveries.inc()
        if delivery.attempt > self._max_deliveries:
            # Earlier deliveries never settled: whoever had them died or wedged on it.
            # Do not hand it to this process's handler as well.
            await self._dead_letter(msg, delivery, "deliveries never settled")
            return
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        # Continue the trace of the request that produced the verdict (the publisher
        # puts W3C trace context in the message headers).
        span = _tracer.start_as_current_span(
            f"{self.durable} handle", context=extract_context(delivery.headers)
        )
        # The heartbeat keeps a running handler's message from redelivery, so a handler
        # stuck on an await would hold it (and a slot) for ever: bound the run.
        deadline = asyncio.timeout(self._handler_timeout)
        try:
            with span:
                async with deadline:
                    disposition = await self._handler(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = (
                "timeout"
                if deadline.expired()
                else "dependency"
                if is_dependency_failure(exc)
                else "error"
            )
            self._log_failure(reason, exc, delivery)
            disposition = Retry(
                backoff_delay(delivery.attempt, self._retry_base),
                _RETRY_REASONS[reason],
            )
        finally:
            heartbeat.cancel()
        if isinstance(disposition, Retry) and delivery.attempt >= self._max_deliveries:
            await self._dead_letter(msg, delivery, disposition.reason or "retries exhausted")
            return
        await self._settle(msg, disposition)

    def _log_failure(self, reason: str, exc: Exception, delivery: Delivery) -> None:
        """One line per failed run. A dependency being away (a PostgreSQL restart fails
        every message in flight, on every replica) is expected and says what failed in one
        line; only an unexpected error, likely a bug, is an ERROR with its traceback."""
        HANDLER_FAILURES.labels(self.durable, reason).inc()
        fields = {"consumer": self.durable, "stream_sequence": delivery.stream_sequence}
        if reason == "error":
            logger.error(
                "handler failed; message will be redelivered",
                exc_info=exc,
                extra={"event": "handler_failed", **fields},
            )
        else:
            logger.warning(
                "handler timed out; message will be redelivered"
                if reason == "timeout"
                else "handler could not reach a dependency; message will be redelivered",
                extra={
                    "event": "handler_timeout" if reason == "timeout" else "handler_unavailable",
                    "error": f"{type(exc).__name__}: {exc}"[:200],
                    **fields,
                },
            )

    async def _dead_letter(self, msg: Msg, delivery: Delivery, reason: str) -> None:
        DEAD_LETTERED.labels(self.durable).inc()
        logger.error(
            "message dead-lettered after too many deliveries; it will not be redelivered",
            extra={
                "event": "dead_lettered",
                "consumer": self.durable,
                "stream": self.stream,
                "stream_sequence": delivery.stream_sequence,
                "attempt": delivery.attempt,
                "reason": reason,
            },
        )
        try:
            await msg.term()
        except Exception as exc:
            # Not terminated: it comes back after ack_wait and is dead-lettered again.
            logger.warning(
                "could not terminate a dead-lettered message",
                extra={"event": "settle_failed", "error": str(exc)},
            )

    async def _keep_alive(self, msg: Msg) -> None:
        # "Working on it": resets ack_wait so a slow side effect is not handed to another
        # replica while this one is still trying.
        interval = max(0.5, self._ack_wait / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _settle(self, msg: Msg, disposition: Disposition) -> None:
        try:
            if isinstance(disposition, Retry):
                await msg.nak(delay=max(0.001, disposition.delay))
            else:
                await msg.ack_sync(timeout=5.0)
        except Exception as exc:
            # Unacknowledged messages come back after ack_wait; handlers are idempotent.
            logger.warning(
                "could not settle message; it will be redelivered",
                extra={"event": "settle_failed", "error": str(exc)},
            )


def run_with_runtime(
    runtime: ServiceRuntime,
    name: str,
    work: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    close: Callable[[], Awaitable[object]] | None = None,
) -> asyncio.Task[None]:
    """Run ``work(runtime.stopping)`` for the life of a service, drained on shutdown.

    ``work`` sees the stop signal at once (so a consumer stops fetching while readiness
    turns 503); the shutdown hook then waits for it to finish before NATS is drained and
    pools close (hooks run last-added first, so call this after connecting). If ``work``
    fails, the service stops; the caller re-raises the failure after ``serve`` returns
    (``raise_if_failed``) so the process exits non-zero.
    """
    task = asyncio.create_task(work(runtime.stopping), name=name)

    def on_done(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            logger.error(
                "%s stopped with an error; stopping the service",
                name,
                exc_info=t.exception(),
                extra={"event": "task_failed", "task": name},
            )
            runtime.request_stop()
        elif not runtime.stopping.is_set():
            runtime.request_stop()

    task.add_done_callback(on_done)

    async def finish() -> None:
        await asyncio.wait([task])  # its failure, if any, was handled by on_done
        if close is not None:
            await close()

    runtime.add_shutdown_hook(name, finish)
    return task


def raise_if_failed(task: asyncio.Task[None]) -> None:
    """Re-raise the failure of a task started by ``run_with_runtime``, if it failed."""
    if task.done() and not task.cancelled():
        exc = task.exception()
        if exc is not None:
            raise exc

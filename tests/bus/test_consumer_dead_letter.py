"""Poison messages are dead-lettered after a bounded number of deliveries (real JetStream).

A handler that always fails, or a message whose deliveries never settle (the process
handling it died or wedged), must not come back for ever: after ``max_deliveries`` the
consumer loop terminates it and counts it in ``warden_bus_dead_lettered_total``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from tests.cut_connections import cut_connection
from tests.moderator.verdict_stream import (
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from warden.bus.consumer import ACK, Delivery, Disposition, PullConsumer
from warden.bus.streams import durable_consumer_config, ensure_verdicts_stream
from warden.bus.subjects import VERDICTS_STREAM


@pytest.fixture
async def js(nats_client: NATS) -> Any:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    return js


@pytest.fixture
async def durable(js: Any) -> AsyncIterator[str]:
    name = f"test-dead-letter-{uuid.uuid4().hex[:12]}"
    await fresh_durable(js, name, ack_wait=1.0)
    yield name
    await js.delete_consumer(VERDICTS_STREAM, name)


def dead_lettered(durable: str) -> float:
    value = REGISTRY.get_sample_value("warden_bus_dead_lettered_total", {"consumer": durable})
    return value or 0.0


async def nothing_pending(js: Any, durable: str, seq: int) -> bool:
    info = await js.consumer_info(VERDICTS_STREAM, durable)
    return bool(
        info.delivered.stream_seq >= seq and info.num_ack_pending == 0 and info.num_pending == 0
    )


def test_new_consumers_let_jetstream_stop_just_past_the_loops_limit() -> None:
    config = durable_consumer_config("x", "warden.verdict.prohibited", 30.0, max_deliveries=4)
    assert config.max_deliver == 5


async def test_a_handler_that_always_raises_is_dead_lettered(js: Any, durable: str) -> None:
    attempts: list[int] = []

    async def broken(delivery: Delivery) -> Disposition:
        attempts.append(delivery.attempt)
        raise RuntimeError("poison")

    consumer = PullConsumer(
        js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=broken,
        max_in_flight=2,
        retry_base_seconds=0.05,
        max_deliveries=3,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    seq = await publish_verdict(js, prohibited_verdict("!r:hs.test"))
    await wait_for(lambda: len(attempts) >= 3, "three deliveries")
    await wait_for(lambda: nothing_pending(js, durable, seq), "the message to be given up")
    # Longer than ack_wait (1 s) and every backoff: a message left unsettled, or
    # negatively acknowledged, would be back by now.
    await asyncio.sleep(2.5)
    stopping.set()
    await asyncio.wait_for(task, 30)
    assert attempts == [1, 2, 3]
    assert dead_lettered(durable) == 1
    assert await nothing_pending(js, durable, seq)


async def test_a_message_whose_deliveries_never_settled_is_dead_lettered_unhandled(
    js: Any, durable: str
) -> None:
    seq = await publish_verdict(js, prohibited_verdict("!r:hs.test"))
    # Two workers took it and died (or wedged) before settling it: fetched, never acked.
    raw = await js.pull_subscribe_bind(durable=durable, stream=VERDICTS_STREAM)
    for expected in (1, 2):
        msgs = await raw.fetch(batch=1, timeout=10)
        assert msgs[0].metadata.num_delivered == expected
        await asyncio.sleep(1.2)  # ack_wait passes: JetStream hands it out again
    await raw.unsubscribe()

    handled: list[int] = []

    async def handler(delivery: Delivery) -> Disposition:
        handled.append(delivery.attempt)
        raise AssertionError("a message that wedged two workers reached a third")

    consumer = PullConsumer(
        js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=handler,
        max_in_flight=1,
        max_deliveries=2,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    await wait_for(lambda: dead_lettered(durable) == 1, "the message to be dead-lettered")
    await wait_for(lambda: nothing_pending(js, durable, seq), "nothing pending")
    await asyncio.sleep(1.5)  # past ack_wait: it is not coming back
    stopping.set()
    await asyncio.wait_for(task, 30)
    assert handled == []
    assert dead_lettered(durable) == 1


async def test_a_handler_stuck_on_an_await_times_out_and_is_dead_lettered(
    js: Any, durable: str
) -> None:
    # The in-progress heartbeat would otherwise keep this message from ever coming back.
    attempts: list[int] = []

    async def stuck(delivery: Delivery) -> Disposition:
        attempts.append(delivery.attempt)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    consumer = PullConsumer(
        js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=stuck,
        max_in_flight=1,
        retry_base_seconds=0.05,
        max_deliveries=2,
        handler_timeout=0.3,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    seq = await publish_verdict(js, prohibited_verdict("!r:hs.test"))
    await wait_for(lambda: dead_lettered(durable) == 1, "the message to be dead-lettered")
    await wait_for(lambda: nothing_pending(js, durable, seq), "nothing pending")
    await asyncio.sleep(1.5)
    stopping.set()
    await asyncio.wait_for(task, 30)
    assert attempts == [1, 2]


def handler_failures(durable: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "warden_bus_handler_failures_total", {"consumer": durable, "reason": reason}
    )
    return value or 0.0


async def test_a_dependency_away_is_one_warning_line_and_a_bug_an_error_with_its_traceback(
    js: Any, durable: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A PostgreSQL restart fails every message in flight on every replica: each failure
    is one WARNING line naming the error, not an ERROR with a traceback; a failure that
    is not a dependency's stays an ERROR with its traceback. Both are counted."""
    failures = iter(
        [
            ConnectionRefusedError(111, "Connection refused"),
            cut_connection(),
            ValueError("a bug"),
        ]
    )
    attempts: list[int] = []

    async def flaky(delivery: Delivery) -> Disposition:
        attempts.append(delivery.attempt)
        error = next(failures, None)
        if error is not None:
            raise error
        return ACK

    consumer = PullConsumer(
        js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=flaky,
        max_in_flight=1,
        retry_base_seconds=0.05,
        max_deliveries=10,
    )
    stopping = asyncio.Event()
    caplog.set_level(logging.INFO, logger="warden.bus.consumer")
    task = asyncio.create_task(consumer.run(stopping))
    seq = await publish_verdict(js, prohibited_verdict("!r:hs.test"))
    await wait_for(lambda: nothing_pending(js, durable, seq), "the message to be acknowledged")
    stopping.set()
    await asyncio.wait_for(task, 30)

    assert attempts == [1, 2, 3, 4]
    failed = [r for r in caplog.records if getattr(r, "event", "").startswith("handler_")]
    assert [(r.levelno, r.event, r.exc_info is not None) for r in failed] == [  # type: ignore[attr-defined]
        (logging.WARNING, "handler_unavailable", False),
        (logging.WARNING, "handler_unavailable", False),
        (logging.ERROR, "handler_failed", True),
    ]
    assert "ConnectionRefusedError" in failed[0].error  # type: ignore[attr-defined]
    assert "InternalClientError" in failed[1].error  # type: ignore[attr-defined]
    assert handler_failures(durable, "dependency") == 2
    assert handler_failures(durable, "error") == 1
    assert handler_failures(durable, "timeout") == 0

"""The shared JetStream pull-consumer loop (``warden.bus.consumer``) on real JetStream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.moderator.verdict_stream import (
    consumer_settled,
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from warden.bus.consumer import ACK, Delivery, Disposition, PullConsumer, Retry, backoff_delay
from warden.bus.subjects import VERDICTS_STREAM


@pytest.fixture
async def durable(verdicts_js: Any) -> AsyncIterator[str]:
    name = f"test-consumer-{uuid.uuid4().hex[:12]}"
    await fresh_durable(verdicts_js, name)
    yield name
    await verdicts_js.delete_consumer(VERDICTS_STREAM, name)


def test_backoff_grows_and_is_capped() -> None:
    assert 0.8 <= backoff_delay(1, 1.0) <= 1.2
    assert 6.4 <= backoff_delay(4, 1.0) <= 9.6
    assert backoff_delay(50, 1.0, cap=30.0) <= 30.0


async def test_retry_and_handler_errors_are_redelivered_then_acked(
    verdicts_js: Any, durable: str
) -> None:
    attempts: list[int] = []

    async def handler(delivery: Delivery) -> Disposition:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            return Retry(0.05)
        if delivery.attempt == 2:
            raise RuntimeError("handler bug")
        return ACK

    consumer = PullConsumer(
        verdicts_js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=handler,
        max_in_flight=4,
        retry_base_seconds=0.05,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    seq = await publish_verdict(verdicts_js, prohibited_verdict("!r:hs.test"))
    await wait_for(lambda: consumer_settled(verdicts_js, durable, seq), "the ack")
    stopping.set()
    await asyncio.wait_for(task, 30)
    assert attempts == [1, 2, 3]


async def test_stop_lets_in_flight_handlers_finish_and_ack(verdicts_js: Any, durable: str) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[int] = []

    async def handler(delivery: Delivery) -> Disposition:
        started.set()
        await release.wait()
        finished.append(delivery.stream_sequence)
        return ACK

    consumer = PullConsumer(
        verdicts_js, stream=VERDICTS_STREAM, durable=durable, handler=handler, max_in_flight=2
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    seq = await publish_verdict(verdicts_js, prohibited_verdict("!r:hs.test"))
    await asyncio.wait_for(started.wait(), 30)
    stopping.set()  # as SIGTERM does
    await asyncio.sleep(0.2)
    assert not task.done()  # still draining the in-flight message
    release.set()
    await asyncio.wait_for(task, 30)
    assert finished == [seq]
    assert await consumer_settled(verdicts_js, durable, seq)


async def test_drain_timeout_leaves_message_for_redelivery(verdicts_js: Any, durable: str) -> None:
    async def stuck(delivery: Delivery) -> Disposition:
        await asyncio.sleep(3600)
        return ACK

    consumer = PullConsumer(
        verdicts_js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=stuck,
        max_in_flight=1,
        drain_timeout=0.2,
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    await publish_verdict(verdicts_js, prohibited_verdict("!r:hs.test"))

    async def in_flight() -> bool:
        info = await verdicts_js.consumer_info(VERDICTS_STREAM, durable)
        return bool(info.num_ack_pending == 1)

    await wait_for(in_flight, "the message in flight")
    stopping.set()
    await asyncio.wait_for(task, 30)
    info = await verdicts_js.consumer_info(VERDICTS_STREAM, durable)
    assert info.num_ack_pending == 1  # not acked: JetStream will hand it out again

"""Consumer lag and redeliveries of a real JetStream durable consumer, as gauges."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from tests.moderator.verdict_stream import (
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from warden.bus.consumer import ACK, Delivery, Disposition, PullConsumer, Retry
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import VERDICTS_STREAM


@pytest.fixture
async def js(nats_client: NATS) -> Any:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    return js


@pytest.fixture
async def durable(js: Any) -> AsyncIterator[str]:
    name = f"test-lag-{uuid.uuid4().hex[:12]}"
    await fresh_durable(js, name, ack_wait=30.0)
    yield name
    await js.delete_consumer(VERDICTS_STREAM, name)


def gauge(name: str, durable: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"consumer": durable})


async def test_lag_gauges_follow_pending_and_unacknowledged_messages(js: Any, durable: str) -> None:
    release = asyncio.Event()
    retried: set[int] = set()

    async def slow(delivery: Delivery) -> Disposition:
        if delivery.stream_sequence not in retried:
            retried.add(delivery.stream_sequence)
            return Retry(0.05)  # redelivered once
        await release.wait()
        return ACK

    consumer = PullConsumer(
        js,
        stream=VERDICTS_STREAM,
        durable=durable,
        handler=slow,
        max_in_flight=8,
        lag_poll_seconds=0.1,
    )
    for _ in range(3):
        await publish_verdict(js, prohibited_verdict("!lag:hs.test"))

    # Before anything is fetched: three waiting, none delivered.
    await consumer.poll_lag_once()
    assert gauge("warden_bus_consumer_pending", durable) == 3
    assert gauge("warden_bus_consumer_ack_pending", durable) == 0

    stopping = asyncio.Event()
    task = asyncio.create_task(consumer.run(stopping))
    try:
        # Fetched and redelivered once, now held by the handler: delivered, unacknowledged.
        await wait_for(
            lambda: (
                gauge("warden_bus_consumer_ack_pending", durable) == 3
                and gauge("warden_bus_consumer_pending", durable) == 0
                and gauge("warden_bus_consumer_redelivered", durable) == 3
            ),
            "the poller to report three unacknowledged, redelivered messages",
        )
        assert gauge("warden_bus_redeliveries_total", durable) == 3
        release.set()
        await wait_for(
            lambda: (
                gauge("warden_bus_consumer_ack_pending", durable) == 0
                and gauge("warden_bus_consumer_redelivered", durable) == 0
            ),
            "the poller to report everything acknowledged",
        )
        assert gauge("warden_bus_consumer_pending", durable) == 0
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)

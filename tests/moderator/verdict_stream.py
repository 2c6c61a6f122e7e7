"""Helpers for tests of JetStream verdict consumers (moderator and webhooks)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from warden.bus.subjects import VERDICTS_STREAM, verdict_subject
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict


async def fresh_durable(
    js: Any, name: str, *, ack_wait: float = 30.0, subject: str | None = None
) -> None:
    """(Re)create a durable consumer on prohibited verdicts (or ``subject``) that starts
    at new messages.

    Starting at new messages keeps each test away from verdicts other tests (and other
    test sessions sharing the NATS server) left in the stream.
    """
    with contextlib.suppress(Exception):
        await js.delete_consumer(VERDICTS_STREAM, name)
    await js.add_consumer(
        VERDICTS_STREAM,
        ConsumerConfig(
            durable_name=name,
            filter_subject=subject or verdict_subject(ContentClass.PROHIBITED.label),
            deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
        ),
    )


def prohibited_verdict(
    room_id: str,
    *,
    sender: str = "@spammer:evil.test",
    origin: str = "other.test",
    community_id: str = "default",
    **extra: Any,
) -> Verdict:
    """A prohibited first-time verdict with a fresh event ID."""
    return Verdict(
        event_id=f"${uuid.uuid4().hex}",
        content_class=ContentClass.PROHIBITED,
        harms=("org.matrix.msc4387.spam",),
        filters=(FilterOutcome("keyword", ContentClass.PROHIBITED, ("org.matrix.msc4387.spam",)),),
        room_id=room_id,
        community_id=community_id,
        sender=sender,
        event_type="m.room.message",
        origin=origin,
        reference_hash="x" * 43,
        first_seen_ts=1_700_000_000_000,
        extra=extra,
    )


async def publish_verdict(js: Any, verdict: Verdict, *, msg_id: str | None = None) -> int:
    """Publish as the filter worker does (``Nats-Msg-Id`` = event ID); return the seq."""
    ack = await js.publish(
        verdict_subject(verdict.content_class.label),
        verdict.to_json(),
        headers={"Nats-Msg-Id": msg_id or verdict.event_id},
    )
    return int(ack.seq)


async def wait_for(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    what: str,
    timeout: float = 30.0,
) -> None:
    """Poll ``condition`` until true; fail naming ``what`` if it never becomes true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def consumer_settled(js: Any, durable: str, seq: int) -> bool:
    """True once the consumer has delivered up to ``seq`` and nothing awaits an ack."""
    info = await js.consumer_info(VERDICTS_STREAM, durable)
    return bool(
        info.delivered.stream_seq >= seq and info.num_ack_pending == 0 and info.num_pending == 0
    )

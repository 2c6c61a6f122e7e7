"""The verdict streams (M9): refusals to act on are never evicted to make room for
neutral verdicts, and a full stream refuses new ones (the outbox retries) rather than
dropping unprocessed ones."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig

from warden.bus.streams import VerdictStreams, ensure_verdicts_stream
from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict
from warden_filter_worker.publisher import VerdictPublisher

PADDING = "x" * 400  # a verdict message of about the size of a real one


def verdict(content_class: ContentClass) -> Verdict:
    prohibited = content_class is ContentClass.PROHIBITED
    return Verdict(
        event_id=f"${uuid.uuid4().hex}",
        content_class=content_class,
        harms=(SPAM,) if prohibited else (),
        filters=(FilterOutcome("keyword", content_class, (SPAM,) if prohibited else ()),),
        room_id="!room:test",
        community_id="default",
        sender="@spammer:evil.test",
        event_type="m.room.message",
        origin="other.test",
        reference_hash="r" * 43,
        first_seen_ts=1,
        extra={"padding": PADDING},
    )


@pytest.fixture
async def streams(nats_client: NATS) -> AsyncIterator[VerdictStreams]:
    """Small verdict streams of this test's own (names and subjects)."""
    tag = uuid.uuid4().hex[:10]
    streams = VerdictStreams(
        actionable=f"TEST_ACT_{tag}",
        log=f"TEST_LOG_{tag}",
        subject_prefix=f"test{tag}.verdict.",
        moderation_subject=f"test{tag}.moderate",
        max_bytes=16 * 1024,
        log_max_bytes=8 * 1024,
    )
    yield streams
    js = nats_client.jetstream()
    for name in (streams.actionable, streams.log):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)


async def moderator_like_consumer(js: Any, streams: VerdictStreams) -> Any:
    durable = "test-moderator"
    await js.add_consumer(
        streams.actionable,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=streams.subject_prefix + "prohibited",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    return await js.pull_subscribe_bind(durable=durable, stream=streams.actionable)


async def test_a_refusal_is_delivered_after_many_neutral_verdicts(
    nats_client: NATS, streams: VerdictStreams
) -> None:
    """The review's test: the moderator is down, one prohibited verdict then far more
    neutral ones than the size bound hold; the refusal is still there to act on."""
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js, streams)
    published: list[str] = []
    publisher = VerdictPublisher(
        nats_client, subject_prefix=streams.subject_prefix, on_published=published.append
    )
    refusal = verdict(ContentClass.PROHIBITED)
    assert await publisher.publish_now(refusal)
    for _ in range(100):  # about 60 KB: several times both streams' bounds
        assert await publisher.publish_now(verdict(ContentClass.NEUTRAL))
    assert len(published) == 101

    log = await js.stream_info(streams.log)
    assert log.state.first_seq > 1  # the neutral record did drop its oldest
    sub = await moderator_like_consumer(js, streams)
    (msg,) = await sub.fetch(batch=10, timeout=2)
    assert Verdict.from_json(msg.data).event_id == refusal.event_id
    await msg.ack()


async def test_a_full_stream_refuses_new_refusals_and_keeps_the_old(
    nats_client: NATS, streams: VerdictStreams
) -> None:
    """Unprocessed refusals fill the stream: the next publish fails (not acknowledged,
    so the outbox keeps the row and retries), and the first refusal is still delivered."""
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js, streams)
    published: list[str] = []
    publisher = VerdictPublisher(
        nats_client, subject_prefix=streams.subject_prefix, on_published=published.append
    )
    refusals = [verdict(ContentClass.PROHIBITED) for _ in range(60)]  # about 36 KB
    accepted = [await publisher.publish_now(v) for v in refusals]
    assert accepted[0] and not accepted[-1]
    assert refusals[-1].event_id not in published  # stays unpublished in the outbox

    sub = await moderator_like_consumer(js, streams)
    first = (await sub.fetch(batch=1, timeout=2))[0]
    assert Verdict.from_json(first.data).event_id == refusals[0].event_id


async def test_a_single_stream_of_an_older_deployment_is_split(
    nats_client: NATS, streams: VerdictStreams
) -> None:
    js = nats_client.jetstream()
    await js.add_stream(
        StreamConfig(
            name=streams.actionable,
            subjects=[streams.subject_prefix + "*"],
            discard=DiscardPolicy.OLD,
            max_bytes=1024 * 1024,
        )
    )
    old = VerdictPublisher(nats_client, subject_prefix=streams.subject_prefix)
    refusal = verdict(ContentClass.PROHIBITED)
    assert await old.publish_now(verdict(ContentClass.NEUTRAL))
    assert await old.publish_now(refusal)

    await ensure_verdicts_stream(js, streams)

    info = await js.stream_info(streams.actionable)
    assert set(info.config.subjects or ()) == set(streams.actionable_subjects)
    assert info.config.discard == DiscardPolicy.NEW
    assert info.state.messages == 1  # the neutral one purged, the refusal kept
    sub = await moderator_like_consumer(js, streams)
    (msg,) = await sub.fetch(batch=10, timeout=2)
    assert Verdict.from_json(msg.data).event_id == refusal.event_id
    assert await old.publish_now(verdict(ContentClass.NEUTRAL))  # now on the log stream
    assert (await js.stream_info(streams.log)).state.messages == 1

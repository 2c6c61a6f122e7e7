"""The verdict outbox: a verdict committed but never published (a worker died in
between) still reaches JetStream, and published rows keep no content."""

from __future__ import annotations

import time
import uuid

import asyncpg
import orjson
from nats.aio.client import Client as NATS

from tests.filter_worker.test_worker_processes import stream_messages_for, verdict_stream_marks
from warden.bus.streams import ensure_verdicts_stream
from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict
from warden.storage.verdicts import insert_verdicts
from warden_filter_worker.outbox import OutboxSweeper, PublishedMarker
from warden_filter_worker.publisher import VerdictPublisher


def committed_verdict(first_seen_ts: int) -> Verdict:
    return Verdict(
        event_id=f"${uuid.uuid4().hex}",
        content_class=ContentClass.PROHIBITED,
        harms=(SPAM,),
        filters=(FilterOutcome("keyword", ContentClass.PROHIBITED, (SPAM,)),),
        room_id="!outbox:test",
        community_id="default",
        sender="@spammer:elsewhere.test",
        event_type="m.room.message",
        origin="origin.test",
        reference_hash="x",
        first_seen_ts=first_seen_ts,
        extra={"source": "sign", "body_excerpt": "buy spam now"},
    )


async def row(pool: asyncpg.Pool, event_id: str) -> asyncpg.Record:
    r = await pool.fetchrow(
        "SELECT published, outbox_extra FROM verdicts WHERE event_id = $1", event_id
    )
    assert r is not None
    return r


async def test_a_lost_publication_is_swept_to_jetstream(
    pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    first_seq = await verdict_stream_marks(js)
    # Committed a minute ago, never published: what a crash after commit leaves.
    lost = committed_verdict(int(time.time() * 1000) - 60_000)
    recent = committed_verdict(int(time.time() * 1000))
    await insert_verdicts(pg_pool, [lost, recent])
    assert (await row(pg_pool, lost.event_id))["published"] is False
    assert orjson.loads((await row(pg_pool, lost.event_id))["outbox_extra"])["source"] == "sign"

    publisher = VerdictPublisher(nats_client)
    sweeper = OutboxSweeper(pg_pool, publisher.publish_now, interval_seconds=1, min_age_seconds=30)
    assert await sweeper.sweep_once() >= 1

    messages = await stream_messages_for(nats_client, first_seq, lost.event_id)
    assert len(messages) == 1
    on_stream = orjson.loads(messages[0].data)
    assert on_stream["extra"] == {"source": "sign", "body_excerpt": "buy spam now"}
    assert Verdict.from_dict(on_stream).harms == (SPAM,)
    after = await row(pg_pool, lost.event_id)
    assert after["published"] is True
    assert after["outbox_extra"] is None  # the excerpt is gone once published
    # A verdict younger than the retry window is left to its own publisher.
    assert (await row(pg_pool, recent.event_id))["published"] is False
    # Nothing left to sweep for that event: a second sweep does not publish it again.
    await sweeper.sweep_once()
    assert len(await stream_messages_for(nats_client, first_seq, lost.event_id)) == 1


async def test_acknowledged_publications_are_marked_in_batches(
    pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    marker = PublishedMarker(pg_pool)
    publisher = VerdictPublisher(nats_client, on_published=marker.add)
    verdicts = [committed_verdict(int(time.time() * 1000)) for _ in range(5)]
    await insert_verdicts(pg_pool, verdicts)
    for v in verdicts:
        assert await publisher.publish(v)
    for v in verdicts:
        assert (await row(pg_pool, v.event_id))["published"] is False  # not yet flushed
    await marker.flush()
    for v in verdicts:
        r = await row(pg_pool, v.event_id)
        assert r["published"] is True
        assert r["outbox_extra"] is None

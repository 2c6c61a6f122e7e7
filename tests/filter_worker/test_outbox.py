"""The verdict outbox: a verdict committed but never published (a worker died in
between) still reaches JetStream, and published rows keep no content."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid

import asyncpg
import orjson
from nats.aio.client import Client as NATS

from tests.cut_connections import CutConnectionPool
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


async def test_no_row_lock_or_transaction_is_held_across_publishes(
    pg_pool: asyncpg.Pool, pg_database: str, nats_client: NATS
) -> None:
    """Review L12: publishes (up to 2 s each when NATS is down) run with nothing held.

    While each publish runs, another connection can lock the row being published
    (NOWAIT: the sweeper holds no row lock on it), a second sweeper finds the row leased
    and leaves it, and the sweeper's own pool (one connection) is free.
    """
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    old = int(time.time() * 1000) - 60_000
    ours = [committed_verdict(old) for _ in range(3)]
    await insert_verdicts(pg_pool, ours)
    ids = {v.event_id for v in ours}
    publisher = VerdictPublisher(nats_client)
    sweeper_pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=1)
    assert sweeper_pool is not None
    seen: list[str] = []
    taken_by_other: list[str] = []
    refused = ours[2].event_id

    async def by_other(verdict: Verdict) -> bool:
        taken_by_other.append(verdict.event_id)
        return await publisher.publish_now(verdict)

    async def publish(verdict: Verdict) -> bool:
        if verdict.event_id not in ids:
            return await publisher.publish_now(verdict)
        seen.append(verdict.event_id)
        async with pg_pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT event_id FROM verdicts WHERE event_id = $1 FOR UPDATE NOWAIT",
                verdict.event_id,
            )
            assert locked == verdict.event_id
        other = OutboxSweeper(pg_pool, by_other, interval_seconds=1, min_age_seconds=30)
        await other.sweep_once()
        async with asyncio.timeout(10):  # one connection: free unless held by the sweep
            assert await sweeper_pool.fetchval("SELECT 1") == 1
        if verdict.event_id == refused:
            return False  # NATS said no: released for the next sweep
        return await publisher.publish_now(verdict)

    try:
        sweeper = OutboxSweeper(sweeper_pool, publish, interval_seconds=1, min_age_seconds=30)
        await sweeper.sweep_once()
    finally:
        await sweeper_pool.close()

    assert sorted(seen) == sorted(ids)
    assert ids.isdisjoint(taken_by_other)  # leased: the other sweeper left them alone
    assert (await row(pg_pool, ours[0].event_id))["published"] is True
    assert (await row(pg_pool, refused))["published"] is False
    claimable = await pg_pool.fetchval(
        "SELECT outbox_claimed_until FROM verdicts WHERE event_id = $1", refused
    )
    assert claimable == 0


async def test_the_marker_outlives_a_connection_cut_by_a_shutting_down_server(
    pg_pool: asyncpg.Pool,
) -> None:
    for error in (
        asyncpg.exceptions.InternalClientError("cannot switch to state 12"),
        asyncpg.InterfaceError("connection is closed"),
    ):
        marker = PublishedMarker(CutConnectionPool(pg_pool, error), interval_seconds=0.05)  # type: ignore[arg-type]
        verdicts = [committed_verdict(int(time.time() * 1000)) for _ in range(3)]
        await insert_verdicts(pg_pool, verdicts)
        for v in verdicts:
            marker.add(v.event_id)
        task = asyncio.create_task(marker.run())
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                # The failed batch was kept and marked by the next flush.
                if all([(await row(pg_pool, v.event_id))["published"] for v in verdicts]):
                    break
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
            assert all([(await row(pg_pool, v.event_id))["published"] for v in verdicts])
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_without_the_verdict_log_only_refusals_enter_the_outbox(
    pg_pool: asyncpg.Pool,
) -> None:
    now = int(time.time() * 1000)
    refusal = committed_verdict(now)
    neutral = dataclasses.replace(
        committed_verdict(now), content_class=ContentClass.NEUTRAL, harms=(), filters=()
    )
    allowed = dataclasses.replace(neutral, event_id=f"${uuid.uuid4().hex}")
    allowed = dataclasses.replace(allowed, content_class=ContentClass.ALLOWED)

    await insert_verdicts(pg_pool, [refusal, neutral, allowed], verdict_log=False)

    # The refusal waits for JetStream with its extras; the others are done at insert.
    assert (await row(pg_pool, refusal.event_id))["published"] is False
    assert orjson.loads((await row(pg_pool, refusal.event_id))["outbox_extra"])["source"]
    for quiet in (neutral, allowed):
        r = await row(pg_pool, quiet.event_id)
        assert r["published"] is True and r["outbox_extra"] is None
    # With the log, every class waits for JetStream (what the sweeper publishes).
    logged = dataclasses.replace(neutral, event_id=f"${uuid.uuid4().hex}")
    await insert_verdicts(pg_pool, [logged], verdict_log=True)
    assert (await row(pg_pool, logged.event_id))["published"] is False

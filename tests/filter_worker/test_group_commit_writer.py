"""The group-commit writer: concurrent verdicts share transactions; first writer wins."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict
from warden.storage.verdicts import get_verdict, insert_verdicts
from warden_filter_worker import group_commit
from warden_filter_worker.group_commit import GroupCommitWriter, WriterClosed


def verdict(event_id: str, cls: ContentClass = ContentClass.NEUTRAL, origin: str = "o") -> Verdict:
    harms = (SPAM,) if cls is ContentClass.PROHIBITED else ()
    return Verdict(
        event_id=event_id,
        content_class=cls,
        harms=harms,
        filters=(FilterOutcome("keyword", cls, harms, duration_ms=0.25),),
        room_id="!r:x",
        community_id="default",
        sender="@u:x",
        event_type="m.room.message",
        origin=origin,
        reference_hash="h",
        first_seen_ts=123,
    )


async def test_concurrent_writes_are_batched(pg_pool: asyncpg.Pool) -> None:
    writer = GroupCommitWriter(pg_pool, max_delay=0.005)
    try:
        ours = [verdict(f"${uuid.uuid4().hex}") for _ in range(60)]
        winners = await asyncio.gather(*(writer.write(v) for v in ours))
    finally:
        await writer.close()
    assert [w.event_id for w in winners] == [v.event_id for v in ours]
    assert all(w.to_json() == v.to_json() for w, v in zip(winners, ours, strict=True))
    assert writer.verdicts_written == 60
    assert writer.transactions < 60  # fewer transactions than verdicts: batched
    for v in ours[:3]:
        stored = await get_verdict(pg_pool, v.event_id)
        assert stored is not None and stored.to_json() == v.to_json()


async def test_each_waiter_gets_the_winner(pg_pool: asyncpg.Pool) -> None:
    writer = GroupCommitWriter(pg_pool)
    try:
        # Already stored: every later write gets the stored one back.
        eid = f"${uuid.uuid4().hex}"
        first = verdict(eid, ContentClass.PROHIBITED, "first")
        await insert_verdicts(pg_pool, [first])
        late = await asyncio.gather(
            *(writer.write(verdict(eid, ContentClass.NEUTRAL, f"late{i}")) for i in range(5))
        )
        assert {w.to_json() for w in late} == {first.to_json()}

        # Racing within one batch: one wins, all see it.
        eid2 = f"${uuid.uuid4().hex}"
        racers = [verdict(eid2, ContentClass(i % 3), f"r{i}") for i in range(9)]
        results = await asyncio.gather(*(writer.write(v) for v in racers))
        assert len({r.to_json() for r in results}) == 1
        stored = await get_verdict(pg_pool, eid2)
        assert stored is not None and stored.to_json() == results[0].to_json()
    finally:
        await writer.close()


async def test_a_failed_batch_fails_its_waiters_only(pg_pool: asyncpg.Pool) -> None:
    calls = 0

    async def flaky(pool: asyncpg.Pool, batch: Sequence[Verdict]) -> dict[str, Verdict]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.PostgresError("injected failure")
        return await insert_verdicts(pool, batch)

    writer = GroupCommitWriter(pg_pool, insert=flaky)
    try:
        with pytest.raises(asyncpg.PostgresError):
            await writer.write(verdict(f"${uuid.uuid4().hex}"))
        v = verdict(f"${uuid.uuid4().hex}")
        assert (await writer.write(v)).to_json() == v.to_json()  # the writer keeps going
    finally:
        await writer.close()
    with pytest.raises(WriterClosed):
        await writer.write(verdict("$closed"))


async def test_close_flushes_queued_writes(pg_pool: asyncpg.Pool) -> None:
    writer = GroupCommitWriter(pg_pool, max_delay=0.05)
    pending = [asyncio.create_task(writer.write(verdict(f"${uuid.uuid4().hex}"))) for _ in range(5)]
    await asyncio.sleep(0)  # queued, still lingering for company
    await writer.close()
    written = await asyncio.gather(*pending)
    for w in written:
        assert await get_verdict(pg_pool, w.event_id) is not None


async def test_queued_verdicts_are_taken_without_waiting_for_each(
    pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``wait_for`` costs a task and a timer: only for an empty queue, not per verdict.
    waits = 0
    wait_for = asyncio.wait_for

    async def counting_wait_for(*args: Any, **kwargs: Any) -> Any:
        nonlocal waits
        waits += 1
        return await wait_for(*args, **kwargs)

    monkeypatch.setattr(group_commit.asyncio, "wait_for", counting_wait_for)
    writer = GroupCommitWriter(pg_pool, max_delay=0.05)
    try:
        ours = [verdict(f"${uuid.uuid4().hex}") for _ in range(50)]
        winners = await asyncio.gather(*(writer.write(v) for v in ours))
    finally:
        await writer.close()
    assert [w.event_id for w in winners] == [v.event_id for v in ours]
    assert writer.transactions == 1  # all arrived together: one batch
    assert waits <= 2  # the linger after the queue ran dry, not one per verdict


async def test_a_verdict_is_committed_without_waiting_for_company(pg_pool: asyncpg.Pool) -> None:
    # By default the writer takes what is queued and commits: no timer. A linger would
    # hold the insert for its delay, far longer than a few turns of the event loop.
    inserting = asyncio.Event()

    async def noting_insert(pool: asyncpg.Pool, batch: Sequence[Verdict]) -> dict[str, Verdict]:
        inserting.set()
        return await insert_verdicts(pool, batch)

    writer = GroupCommitWriter(pg_pool, insert=noting_insert)
    lingering = GroupCommitWriter(pg_pool, max_delay=60, insert=noting_insert)
    try:
        write = asyncio.create_task(writer.write(verdict(f"${uuid.uuid4().hex}")))
        for _ in range(10):
            await asyncio.sleep(0)
        assert inserting.is_set()
        await write
        # The same check tells a lingering writer apart.
        inserting.clear()
        lingered = asyncio.create_task(lingering.write(verdict(f"${uuid.uuid4().hex}")))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not inserting.is_set()
        lingered.cancel()
    finally:
        await writer.close()
        await lingering.close()

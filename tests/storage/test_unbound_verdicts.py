"""Unbound verdicts (room v1/v2 refusals imported from policyserv): ``lookup_verdicts``
binds each to the first event asked about, once, in the statement that looks verdicts up;
only refusals may be stored unbound (migration 0012)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from tests.storage.test_repositories import make_verdict
from warden.policy.verdict import ContentClass
from warden.storage import verdicts


async def store_unbound(pool: asyncpg.Pool, event_id: str, cls: int = 2) -> None:
    await pool.execute(
        "INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class, harms,"
        " sender, event_type, origin, first_seen_ts, published)"
        " VALUES ($1, '', '', NULL, $2, '{org.matrix.msc4456.spam}', '', '', '', 1, TRUE)",
        event_id,
        cls,
    )


async def test_an_unbound_refusal_is_bound_to_the_first_ask(pg_pool: asyncpg.Pool) -> None:
    unbound = f"${uuid.uuid4().hex}:old.example"
    ordinary = f"${uuid.uuid4().hex}"
    missing = f"${uuid.uuid4().hex}"
    await store_unbound(pg_pool, unbound)
    await verdicts.insert_verdicts(pg_pool, [make_verdict(ordinary, ContentClass.NEUTRAL, "o")])
    stored = await verdicts.get_verdict(pg_pool, unbound)
    assert stored is not None and stored.reference_hash == ""  # NULL reads as unbound

    got = await verdicts.lookup_verdicts(
        pg_pool,
        [
            (unbound, "first-hash", "!room:x", "comm"),
            (ordinary, "whatever", "!other:x", "other"),
            (missing, "h", "!r:x", "c"),
        ],
    )
    assert set(got) == {unbound, ordinary}
    assert (got[unbound].reference_hash, got[unbound].room_id, got[unbound].community_id) == (
        "first-hash",
        "!room:x",
        "comm",
    )
    assert got[unbound].harms == ("org.matrix.msc4456.spam",)
    # An ordinary verdict is read, never changed.
    assert got[ordinary] == await verdicts.get_verdict(pg_pool, ordinary)
    assert got[ordinary].reference_hash == "abc"

    # Bound once: a later ask with other content gets the verdict as first bound.
    again = await verdicts.lookup_verdicts(pg_pool, [(unbound, "second-hash", "!r2:x", "c2")])
    assert again[unbound] == got[unbound]
    assert await verdicts.get_verdict(pg_pool, unbound) == got[unbound]


async def test_racing_asks_bind_it_once(pg_pool: asyncpg.Pool) -> None:
    unbound = f"${uuid.uuid4().hex}:old.example"
    await store_unbound(pg_pool, unbound)
    hashes = [f"hash-{i}" for i in range(8)]
    results = await asyncio.gather(
        *(verdicts.lookup_verdicts(pg_pool, [(unbound, h, "!r:x", "c")]) for h in hashes)
    )
    stored = await verdicts.get_verdict(pg_pool, unbound)
    assert stored is not None and stored.reference_hash in hashes
    # Each ask saw the one binding, or (bound by a racing ask meanwhile) no verdict.
    assert all(r == {} or r == {unbound: stored} for r in results)
    assert sum(bool(r) for r in results) >= 1


async def test_an_ask_without_a_reference_hash_binds_nothing(pg_pool: asyncpg.Pool) -> None:
    unbound = f"${uuid.uuid4().hex}:old.example"
    await store_unbound(pg_pool, unbound)
    assert await verdicts.lookup_verdicts(pg_pool, [(unbound, "", "!r:x", "c")]) == {}
    stored = await verdicts.get_verdict(pg_pool, unbound)
    assert stored is not None and stored.reference_hash == ""


async def test_only_refusals_may_be_unbound(pg_pool: asyncpg.Pool) -> None:
    for cls in (0, 1):
        with pytest.raises(asyncpg.CheckViolationError):
            await store_unbound(pg_pool, f"${uuid.uuid4().hex}:old.example", cls)


async def test_an_imported_verdict_without_a_room_gets_the_room_of_the_first_ask(
    pg_pool: asyncpg.Pool,
) -> None:
    """policyserv kept no room for a verdict: the first ask with the same content (the
    same reference hash) fills room and community, so check/event_id can answer from it.
    An ask with other content does not."""
    event_id = f"${uuid.uuid4().hex}"
    await pg_pool.execute(
        "INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class, harms,"
        " sender, event_type, origin, first_seen_ts, published)"
        " VALUES ($1, '', '', 'the-hash', 2, '{org.matrix.msc4456.spam}', '', '', '', 1, TRUE)",
        event_id,
    )
    other = await verdicts.lookup_verdicts(pg_pool, [(event_id, "other-hash", "!evil:x", "c2")])
    assert other[event_id].room_id == "" and other[event_id].reference_hash == "the-hash"
    got = await verdicts.lookup_verdicts(pg_pool, [(event_id, "the-hash", "!room:x", "comm")])
    assert (got[event_id].room_id, got[event_id].community_id) == ("!room:x", "comm")
    assert got[event_id].harms == ("org.matrix.msc4456.spam",)
    again = await verdicts.lookup_verdicts(pg_pool, [(event_id, "the-hash", "!other:x", "c3")])
    assert (again[event_id].room_id, again[event_id].community_id) == ("!room:x", "comm")
    assert len(again) == 1


async def test_an_ordinary_lookup_only_reads(pg_pool: asyncpg.Pool) -> None:
    """Looking up bound verdicts is a plain read (it runs in a read-only transaction, as
    on a replica); only a row that needs binding takes a writing statement."""
    ordinary = f"${uuid.uuid4().hex}"
    unbound = f"${uuid.uuid4().hex}:old.example"
    await verdicts.insert_verdicts(pg_pool, [make_verdict(ordinary, ContentClass.NEUTRAL, "o")])
    await store_unbound(pg_pool, unbound)
    async with pg_pool.acquire() as conn:
        await conn.execute("SET default_transaction_read_only = on")
        try:
            got = await verdicts.lookup_verdicts(conn, [(ordinary, "h", "!r:x", "c")])
            assert set(got) == {ordinary}
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await verdicts.lookup_verdicts(conn, [(unbound, "h", "!r:x", "c")])
        finally:
            await conn.execute("RESET default_transaction_read_only")
    bound = await verdicts.lookup_verdicts(pg_pool, [(unbound, "h", "!r:x", "c")])
    assert bound[unbound].reference_hash == "h"

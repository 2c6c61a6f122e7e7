"""The shared repositories against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from warden.policy.harms import SPAM
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict
from warden.storage import communities, displaynames, rooms, verdicts


def make_verdict(event_id: str, cls: ContentClass, origin: str) -> Verdict:
    harms = (SPAM,) if cls is ContentClass.PROHIBITED else ()
    return Verdict(
        event_id=event_id,
        content_class=cls,
        harms=harms,
        filters=(FilterOutcome("keyword", cls, harms, duration_ms=0.5),),
        room_id="!r:x",
        community_id="default",
        sender="@u:x",
        event_type="m.room.message",
        origin=origin,
        reference_hash="abc",
        first_seen_ts=1,
    )


async def test_first_writer_wins_even_when_racing(pg_pool: asyncpg.Pool) -> None:
    eid = f"${uuid.uuid4().hex}"
    attempts = [
        make_verdict(eid, ContentClass.PROHIBITED if i % 2 else ContentClass.NEUTRAL, f"o{i}")
        for i in range(8)
    ]
    results = await asyncio.gather(*(verdicts.insert_verdicts(pg_pool, [v]) for v in attempts))
    winners = {r[eid].to_json() for r in results}
    assert len(winners) == 1  # every writer reads back the same verdict
    stored = await verdicts.get_verdict(pg_pool, eid)
    assert stored is not None
    assert stored.to_json() in winners
    assert stored.filters[0].name == "keyword"
    assert stored.harms == ((SPAM,) if stored.prohibited else ())


async def test_batch_insert_returns_each_winner(pg_pool: asyncpg.Pool) -> None:
    a, b = f"${uuid.uuid4().hex}", f"${uuid.uuid4().hex}"
    await verdicts.insert_verdicts(pg_pool, [make_verdict(a, ContentClass.PROHIBITED, "first")])
    won = await verdicts.insert_verdicts(
        pg_pool,
        [
            make_verdict(a, ContentClass.NEUTRAL, "second"),
            make_verdict(b, ContentClass.NEUTRAL, "x"),
        ],
    )
    assert won[a].origin == "first"
    assert won[a].prohibited
    assert won[b].content_class is ContentClass.NEUTRAL


async def test_an_inserted_verdict_comes_back_as_itself(pg_pool: asyncpg.Pool) -> None:
    a, b, c = (f"${uuid.uuid4().hex}" for _ in range(3))
    first = make_verdict(b, ContentClass.PROHIBITED, "first")
    await verdicts.insert_verdicts(pg_pool, [first])
    mine = make_verdict(a, ContentClass.NEUTRAL, "mine")
    twice = [
        make_verdict(c, ContentClass.NEUTRAL, "c1"),
        make_verdict(c, ContentClass.ALLOWED, "c2"),
    ]
    won = await verdicts.insert_verdicts(
        pg_pool, [mine, make_verdict(b, ContentClass.NEUTRAL, "second"), *twice]
    )
    assert won[a] is mine  # inserted: no need to read it back
    assert won[b].origin == "first"  # lost: the stored row
    # Given twice in one call: the row that went in, read back.
    stored = await verdicts.get_verdict(pg_pool, c)
    assert stored is not None and won[c].to_json() == stored.to_json()
    assert stored.origin in {"c1", "c2"}


async def test_get_verdicts_reads_many_in_one_query(pg_pool: asyncpg.Pool) -> None:
    ids = [f"${uuid.uuid4().hex}" for _ in range(3)]
    await verdicts.insert_verdicts(
        pg_pool,
        [
            make_verdict(ids[0], ContentClass.PROHIBITED, "x"),
            make_verdict(ids[1], ContentClass.NEUTRAL, "y"),
        ],
    )
    got = await verdicts.get_verdicts(pg_pool, ids)
    assert set(got) == set(ids[:2])  # the third has no verdict
    for event_id in ids[:2]:
        one = await verdicts.get_verdict(pg_pool, event_id)
        assert one is not None and got[event_id].to_json() == one.to_json()
    assert await verdicts.get_verdicts(pg_pool, []) == {}


async def test_rooms_and_communities(pg_pool: asyncpg.Pool) -> None:
    assert (await communities.get_community(pg_pool, "default")) is not None
    c = await communities.create_community(pg_pool, "Test community")
    assert c.config == {}
    updated = await communities.update_community(
        pg_pool, c.community_id, config={"keyword_filter_keywords": ["x"]}
    )
    assert updated is not None
    assert updated.config == {"keyword_filter_keywords": ["x"]}
    assert updated.name == "Test community"
    room_id = f"!{uuid.uuid4().hex}:x"
    r = await rooms.put_room(pg_pool, room_id, "12", c.community_id)
    assert (await rooms.get_room(pg_pool, room_id)) == r
    moved = await rooms.put_room(pg_pool, room_id, "12", "default")
    assert moved.community_id == "default"
    assert (await rooms.set_moderator(pg_pool, room_id, "@mod:x")).moderator_user_id == "@mod:x"  # type: ignore[union-attr]
    assert await rooms.delete_room(pg_pool, room_id)
    assert await rooms.get_room(pg_pool, room_id) is None
    await displaynames.replace_displaynames(pg_pool, room_id, {"@a:x": "Alice"})
    assert await displaynames.get_displaynames(pg_pool, room_id) == {"@a:x": "Alice"}


async def test_pool_releases_connections_without_a_reset_round_trip(
    make_settings: Any,
) -> None:
    from warden.storage.database import create_pool

    pool = await create_pool(make_settings(database_max_open_conns=1, database_max_idle_conns=1))
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
        # One connection in the pool: the same session, not reset on release.
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW application_name") == "kept"
            # An open transaction is still rolled back on release.
            tx = conn.transaction()
            await tx.start()
            await conn.execute("CREATE TEMP TABLE t_release (x int)")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT to_regclass('pg_temp.t_release')") is None
    finally:
        await pool.close()


async def test_verdict_lookups_are_planned_for_their_own_ids(
    empty_pg_database: str, make_settings: Any
) -> None:
    # A worker that starts on a new, empty verdicts table: once the table has grown (and
    # autovacuum has not analysed it yet), PostgreSQL switched the lookup to a cached
    # generic plan, a sequential scan (5-7 ms at 30,000 rows, measured). Warden's pools
    # plan every statement for its parameters instead.
    from warden.storage.database import create_pool
    from warden.storage.migrations import migrate

    conn = await asyncpg.connect(empty_pg_database)
    await migrate(conn)
    await conn.execute("ALTER TABLE verdicts SET (autovacuum_enabled = false)")
    settings = make_settings(
        database=empty_pg_database, database_max_open_conns=1, database_max_idle_conns=1
    )
    pool = await create_pool(settings)
    try:
        for i in range(10):
            await verdicts.get_verdicts(pool, [f"$early-{i}", f"$other-{i}"])
        await conn.execute(
            "INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class,"
            " sender, event_type, origin, first_seen_ts)"
            " SELECT '$filled-' || i, '!r:x', 'default', 'h', 0, '@u:x', 'm.room.message',"
            " 'o', i FROM generate_series(1, 30000) AS i"
        )
        for i in range(10):
            await verdicts.get_verdicts(pool, [f"$late-{i}", f"$filled-{i + 1}"])
        async with pool.acquire() as pooled:
            plans = await pooled.fetch(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE 'SELECT event_id, room_id%FROM verdicts%'"
            )
    finally:
        await pool.close()
        await conn.close()
    assert [(p["generic_plans"], p["custom_plans"]) for p in plans] == [(0, 20)]


async def test_inserting_verdicts_is_one_statement(pg_database: str) -> None:
    # Each statement costs PostgreSQL a round trip's CPU: no BEGIN and COMMIT around the
    # insert, which commits on its own; a conflict costs one read back.
    statements: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: statements.append(record.query))

    async def keep_session(conn: asyncpg.Connection) -> None:
        """As Warden's pools (``create_pool``): no reset query on release."""

    pool = await asyncpg.create_pool(
        pg_database, min_size=1, max_size=1, init=log_queries, reset=keep_session
    )
    try:
        batch = [
            make_verdict(f"$one-stmt-{uuid.uuid4().hex}", ContentClass.NEUTRAL, "o")
            for _ in range(3)
        ]
        statements.clear()
        won = await verdicts.insert_verdicts(pool, batch)
        assert len(statements) == 1 and "INSERT INTO verdicts" in statements[0]
        assert all(won[v.event_id] is v for v in batch)

        statements.clear()
        rival = make_verdict(batch[0].event_id, ContentClass.PROHIBITED, "rival")
        again = await verdicts.insert_verdicts(pool, [rival])
        assert len(statements) == 2  # the insert, then the stored row read back
        assert again[rival.event_id].content_class is ContentClass.NEUTRAL
        assert again[rival.event_id].origin == "o"
    finally:
        await pool.close()

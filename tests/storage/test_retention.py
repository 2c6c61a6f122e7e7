"""Retention (``warden.retention``, ``warden.storage.retention``): what a pass prunes and
keeps, in bounded batches, by one process at a time; and ``warden prune``.

A database of its own (a pass prunes every old row it finds, whoever wrote it), emptied
before each test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.conftest import REDIS_URL, _create_database, _drop_database, _pg_url_for
from tests.service_processes import ServiceProcess
from warden import redis_keys
from warden.policy.verdict import SENDER_UNVERIFIED, ContentClass, FilterOutcome, Verdict
from warden.retention import DAY_MS, Pruner, RetentionPolicy
from warden.settings import Settings
from warden.storage import retention as store
from warden.storage import rooms, verdicts
from warden.storage.migrations import migrate

NOW = int(time.time() * 1000)
OLD = NOW - 100 * DAY_MS  # older than every default period
RECENT = NOW - 3_600_000  # an hour ago: newer than every period
SPAM = "org.matrix.msc4456.spam"

TABLES = (
    "verdicts",
    "webhook_deliveries",
    "moderation_actions",
    "room_state_events",
    "room_members",
    "displaynames",
    "room_state",
    "room_memberships",
    "rooms",
    "media_hashes",
    "media_classifications",
)


@pytest.fixture(scope="module")
def retention_database() -> Iterator[str]:
    name = f"warden_test_retention_{uuid.uuid4().hex[:8]}"

    async def setup() -> None:
        await _create_database(name)
        conn = await asyncpg.connect(_pg_url_for(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(setup())
    try:
        yield _pg_url_for(name)
    finally:
        asyncio.run(_drop_database(name))


@pytest.fixture
async def pool(retention_database: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(retention_database, min_size=1, max_size=4)
    assert p is not None
    await p.execute(f"TRUNCATE {', '.join(TABLES)}")
    try:
        yield p
    finally:
        await p.close()


def pruner(pool: asyncpg.Pool, redis: aioredis.Redis, **policy: Any) -> Pruner:
    values: dict[str, Any] = {"batch_pause_seconds": 0.0, **policy}
    return Pruner(pool=pool, redis=redis, policy=RetentionPolicy(**values), clock_ms=lambda: NOW)


def verdict(event_id: str, first_seen_ts: int, *, prohibited: bool = True) -> Verdict:
    cls = ContentClass.PROHIBITED if prohibited else ContentClass.NEUTRAL
    harms = (SPAM,) if prohibited else ()
    return Verdict(
        event_id=event_id,
        content_class=cls,
        harms=harms,
        filters=(FilterOutcome("keyword", cls, harms, duration_ms=0.5),),
        room_id="!r:x",
        community_id="default",
        sender="@spammer:evil.example",
        event_type="m.room.message",
        origin="evil.example",
        reference_hash=f"hash-{event_id}",
        first_seen_ts=first_seen_ts,
        extra={"body_excerpt": "buy now"},
    )


async def store_verdicts(pool: asyncpg.Pool, *items: tuple[str, int, bool]) -> None:
    """(event ID, first seen, published) each; inserted as the filter worker does."""
    await verdicts.insert_verdicts(pool, [verdict(e, ts) for e, ts, _ in items])
    published = [e for e, _, p in items if p]
    await verdicts.mark_published(pool, published)


async def raw_verdict(pool: asyncpg.Pool, event_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT sender, origin, filters, outbox_extra, class, harms, reference_hash"
        " FROM verdicts WHERE event_id = $1",
        event_id,
    )


def sample(table: str, kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "warden_retention_pruned_rows_total", {"table": table, "kind": kind}
    )
    return value or 0.0


def test_the_policy_comes_from_the_settings(make_settings: Callable[..., Settings]) -> None:
    defaults = RetentionPolicy.from_settings(make_settings())
    assert defaults == RetentionPolicy(
        verdict_details_ms=90 * DAY_MS,
        verdicts_ms=0,  # minimal verdicts: forever
        deliveries_ms=30 * DAY_MS,
        left_rooms_ms=7 * DAY_MS,
        media_ms=30 * DAY_MS,
        batch_size=1000,
        batch_pause_seconds=0.1,
    )
    custom = RetentionPolicy.from_settings(
        make_settings(
            retention_verdicts_days=365,
            retention_verdict_details_days=0.5,
            retention_batch_size=50,
            retention_batch_pause_ms=0,
            retention_media_days=0,
        )
    )
    assert (custom.verdicts_ms, custom.verdict_details_ms) == (365 * DAY_MS, DAY_MS // 2)
    assert custom.media_ms == 0
    assert (custom.batch_size, custom.batch_pause_seconds) == (50, 0.0)
    with pytest.raises(ValueError, match="retention_batch_size"):
        make_settings(retention_batch_size=0)


# --- verdicts -----------------------------------------------------------------------


async def test_old_verdict_details_are_cleared_and_the_minimal_verdict_still_answers(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await store_verdicts(pool, ("$old", OLD, True), ("$new", RECENT, True), ("$queued", OLD, False))
    before = sample("verdicts", "details")

    result = await pruner(pool, redis_client).run_pass()

    assert result is not None and result.complete
    assert result.rows == {("verdicts", "details"): 1}
    assert sample("verdicts", "details") - before == 1
    old = await raw_verdict(pool, "$old")
    assert old is not None
    assert (old["sender"], old["origin"], orjson.loads(old["filters"]), old["outbox_extra"]) == (
        "",
        "",
        [],
        None,
    )
    assert (old["class"], list(old["harms"]), old["reference_hash"]) == (2, [SPAM], "hash-$old")
    # Newer than the period: whole.
    new = await raw_verdict(pool, "$new")
    assert new is not None and new["sender"] == "@spammer:evil.example"
    assert orjson.loads(new["filters"])
    # Unpublished (the outbox): whole, its extras too, however old.
    queued = await raw_verdict(pool, "$queued")
    assert queued is not None and queued["sender"] == "@spammer:evil.example"
    assert orjson.loads(queued["outbox_extra"]) == {"body_excerpt": "buy now"}

    # What /sign and check/event_id look up still gives the same answer.
    got = await verdicts.get_verdict(pool, "$old")
    assert got is not None and got.prohibited and got.harms == (SPAM,)
    looked = await verdicts.lookup_verdicts(pool, [("$old", "hash-$old", "!r:x", "default")])
    assert looked["$old"].prohibited and looked["$old"].reference_hash == "hash-$old"
    assert looked["$old"].room_id == "!r:x"  # kept: bound verdicts are never re-bound
    # The verdict still never changes: a second writer loses to the minimal row.
    winners = await verdicts.insert_verdicts(pool, [verdict("$old", NOW, prohibited=False)])
    assert winners["$old"].prohibited

    # A second pass finds nothing left to clear.
    again = await pruner(pool, redis_client).run_pass()
    assert again is not None and again.rows == {}


async def test_an_unverified_sender_stays_unverified_after_its_details_go(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    marked = dataclasses.replace(
        verdict("$unverified", OLD),
        filters=(
            FilterOutcome("keyword", ContentClass.PROHIBITED, (SPAM,)),
            FilterOutcome(SENDER_UNVERIFIED, ContentClass.NEUTRAL),
        ),
    )
    await verdicts.insert_verdicts(pool, [marked, verdict("$verified", OLD)])
    await verdicts.mark_published(pool, ["$unverified", "$verified"])

    result = await pruner(pool, redis_client).run_pass()

    assert result is not None and result.rows == {("verdicts", "details"): 2}
    unverified = await verdicts.get_verdict(pool, "$unverified")
    assert unverified is not None and unverified.sender == ""
    # A moderation request must not take it for attributed to its sender.
    assert not unverified.sender_verified
    assert [f.name for f in unverified.filters] == [SENDER_UNVERIFIED]
    verified = await verdicts.get_verdict(pool, "$verified")
    assert verified is not None and verified.filters == () and verified.sender_verified
    # Pruned rows are not taken again.
    again = await pruner(pool, redis_client).run_pass()
    assert again is not None and again.rows == {}


async def test_minimal_verdicts_are_kept_forever_by_default_and_deleted_when_set(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await store_verdicts(pool, ("$ancient", OLD, True), ("$new", RECENT, True))
    await store_verdicts(pool, ("$queued", OLD, False))
    await pruner(pool, redis_client).run_pass()
    assert await verdicts.get_verdict(pool, "$ancient") is not None

    result = await pruner(pool, redis_client, verdicts_ms=50 * DAY_MS).run_pass()

    assert result is not None and result.rows.get(("verdicts", "deleted")) == 1
    assert await verdicts.get_verdict(pool, "$ancient") is None
    assert await verdicts.get_verdict(pool, "$new") is not None
    assert await verdicts.get_verdict(pool, "$queued") is not None  # unpublished
    # Deleted: the event would be judged afresh, and this time its answer differs.
    winners = await verdicts.insert_verdicts(pool, [verdict("$ancient", NOW, prohibited=False)])
    assert not winners["$ancient"].prohibited


async def test_a_period_of_zero_keeps_everything(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await store_verdicts(pool, ("$old", OLD, True))
    await record_delivery(pool, "webhook_deliveries", "$w", "delivered", OLD)
    await record_media(pool, "mxc://x/old", OLD)
    result = await pruner(
        pool, redis_client, verdict_details_ms=0, deliveries_ms=0, left_rooms_ms=0, media_ms=0
    ).run_pass()
    assert result is not None and result.complete and result.rows == {}
    assert await pool.fetchval("SELECT count(*) FROM media_hashes") == 1
    assert await pool.fetchval("SELECT count(*) FROM media_classifications") == 1
    old = await raw_verdict(pool, "$old")
    assert old is not None and old["sender"] == "@spammer:evil.example"
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 1


# --- media scan results -------------------------------------------------------------


async def record_media(
    pool: asyncpg.Pool, mxc_uri: str, ts: int, community: str = "default"
) -> None:
    """A scan of ``mxc_uri`` and the community's judgement, both written at ``ts``."""
    await pool.execute(
        "INSERT INTO media_hashes (mxc_uri, hashes, ts) VALUES ($1, '{}'::jsonb, $2)",
        mxc_uri,
        ts,
    )
    await pool.execute(
        "INSERT INTO media_classifications (mxc_uri, community_id, class, harms, source,"
        " classified_ts) VALUES ($1, $2, 1, '{}', 'hma', $3)",
        mxc_uri,
        community,
        ts,
    )


async def test_old_media_scan_results_are_deleted_recent_ones_kept(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    for i in range(5):
        await record_media(pool, f"mxc://x/old{i}", OLD)
    await record_media(pool, "mxc://x/recent", RECENT)
    # Judged long after the scan: the judgement is recent, the scan is not.
    await pool.execute("UPDATE media_classifications SET classified_ts = $1 WHERE mxc_uri = $2",
                       RECENT, "mxc://x/old0")  # fmt: skip
    before = sample("media_hashes", "deleted")

    result = await pruner(pool, redis_client, batch_size=2).run_pass()

    assert result is not None and result.complete
    assert result.rows[("media_hashes", "deleted")] == 5
    assert result.rows[("media_classifications", "deleted")] == 4
    assert sample("media_hashes", "deleted") == before + 5
    hashes = await pool.fetch("SELECT mxc_uri FROM media_hashes")
    assert [r["mxc_uri"] for r in hashes] == ["mxc://x/recent"]
    judged = await pool.fetch("SELECT mxc_uri FROM media_classifications ORDER BY mxc_uri")
    assert [r["mxc_uri"] for r in judged] == ["mxc://x/old0", "mxc://x/recent"]
    # A shorter period reaches the recent rows too.
    again = await pruner(pool, redis_client, media_ms=60_000).run_pass()
    assert again is not None
    assert again.rows == {("media_hashes", "deleted"): 1, ("media_classifications", "deleted"): 2}
    with pytest.raises(KeyError):
        await store.delete_old_media(pool, "verdicts", before_ts=NOW, limit=1)


# --- deliveries ---------------------------------------------------------------------


async def record_delivery(
    pool: asyncpg.Pool, table: str, event_id: str, status: str, updated_ts: int
) -> None:
    if table == "webhook_deliveries":
        await pool.execute(
            "INSERT INTO webhook_deliveries (event_id, community_id, url_host, status,"
            " attempts, updated_ts) VALUES ($1, 'default', 'hooks.example', $2, 1, $3)",
            event_id,
            status,
            updated_ts,
        )
    else:
        await pool.execute(
            "INSERT INTO moderation_actions (event_id, room_id, action, moderator_user_id,"
            " status, attempts, updated_ts) VALUES ($1, '!r:x', 'redact', '@mod:x', $2, 1, $3)",
            event_id,
            status,
            updated_ts,
        )


async def test_final_deliveries_are_deleted_after_the_period_pending_ones_never(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    for table, final, other in (
        ("webhook_deliveries", "delivered", "failed"),
        ("moderation_actions", "done", "failed"),
    ):
        await record_delivery(pool, table, "$old-final", final, OLD)
        await record_delivery(pool, table, "$old-failed", other, OLD)
        await record_delivery(pool, table, "$old-pending", "pending", OLD)
        await record_delivery(pool, table, "$new-final", final, RECENT)

    result = await pruner(pool, redis_client).run_pass()

    assert result is not None
    assert result.rows[("webhook_deliveries", "deleted")] == 2
    assert result.rows[("moderation_actions", "deleted")] == 2
    for table in ("webhook_deliveries", "moderation_actions"):
        left = await pool.fetch(f"SELECT event_id FROM {table} ORDER BY event_id")
        assert [r["event_id"] for r in left] == ["$new-final", "$old-pending"]


# --- learned state of rooms Warden left ---------------------------------------------


async def learned_room(
    pool: asyncpg.Pool,
    room_id: str,
    *,
    updated_ts: int,
    protected: bool,
    warden_membership: str | None,
    recorded: tuple[str, int] | None,
) -> None:
    """A room with learned state (a rule, two members, a display name)."""
    if protected:
        await rooms.put_room(pool, room_id, "10", "default")
    await pool.execute(
        "INSERT INTO room_state (room_id, warden_membership, updated_ts, member_count,"
        " displayname_count, rule_count) VALUES ($1, $2, $3, 2, 1, 1)",
        room_id,
        warden_membership,
        updated_ts,
    )
    await pool.execute(
        "INSERT INTO room_state_events (room_id, event_type, state_key, event_id, sender,"
        " depth, content) VALUES ($1, 'm.policy.rule.user', 'r1', '$e', '@a:x', 3,"
        ' \'{"entity": "@spammer:evil.example"}\')',
        room_id,
    )
    for user in ("@alice:x", "@bob:y"):
        await pool.execute(
            "INSERT INTO room_members (room_id, user_id, server_name, membership, event_id)"
            " VALUES ($1, $2, split_part($2, ':', 2), 'join', '$m')",
            room_id,
            user,
        )
    await pool.execute(
        "INSERT INTO displaynames (room_id, user_id, displayname) VALUES ($1, '@alice:x', 'A')",
        room_id,
    )
    if recorded is not None:
        await pool.execute(
            "INSERT INTO room_memberships (room_id, membership, room_version, event_id,"
            " updated_ts) VALUES ($1, $2, '10', '$j', $3)",
            room_id,
            *recorded,
        )


async def held(pool: asyncpg.Pool, room_id: str) -> dict[str, int]:
    return {
        t: await pool.fetchval(f"SELECT count(*) FROM {t} WHERE room_id = $1", room_id)
        for t in ("room_state", *store.LEARNED_STATE_TABLES)
    }


EVERYTHING = {"room_state": 1, "room_state_events": 1, "room_members": 2, "displaynames": 1}
NOTHING = dict.fromkeys(EVERYTHING, 0)


async def test_learned_state_of_rooms_warden_left_is_deleted_after_the_period(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    old = NOW - 8 * DAY_MS
    # Left through the admin API: unprotected, the leave recorded.
    await learned_room(
        pool, "!left:x", updated_ts=old, protected=False, warden_membership="leave",
        recorded=("leave", old),
    )  # fmt: skip
    # Kicked: still protected (/sign refuses it because of the learned membership).
    await learned_room(
        pool, "!kicked:x", updated_ts=old, protected=True, warden_membership="leave",
        recorded=("leave", old),
    )  # fmt: skip
    # Unprotected with DELETE /rooms but Warden is still in it: kept.
    await learned_room(
        pool, "!unprotected:x", updated_ts=old, protected=False, warden_membership="join",
        recorded=("join", old),
    )  # fmt: skip
    # Protected and joined, quiet for a long time: kept.
    await learned_room(
        pool, "!quiet:x", updated_ts=old, protected=True, warden_membership="join",
        recorded=("join", old),
    )  # fmt: skip
    # Left recently: kept until the period is over.
    await learned_room(
        pool, "!recent:x", updated_ts=RECENT, protected=False, warden_membership="leave",
        recorded=("leave", RECENT),
    )  # fmt: skip

    result = await pruner(pool, redis_client).run_pass()

    assert result is not None and result.complete
    assert result.rows == {
        ("room_state_events", "deleted"): 2,
        ("room_members", "deleted"): 4,
        ("displaynames", "deleted"): 2,
        ("room_state", "deleted"): 1,
    }
    assert await held(pool, "!left:x") == NOTHING
    assert await held(pool, "!kicked:x") == {**NOTHING, "room_state": 1}
    kicked = await pool.fetchrow("SELECT * FROM room_state WHERE room_id = '!kicked:x'")
    assert kicked is not None and kicked["warden_membership"] == "leave"
    assert (kicked["member_count"], kicked["displayname_count"], kicked["rule_count"]) == (0, 0, 0)
    assert await rooms.get_active_room(pool, "!kicked:x") is None  # still refused
    for room_id in ("!unprotected:x", "!quiet:x", "!recent:x"):
        assert await held(pool, room_id) == EVERYTHING, room_id
    # The join records stay (the servers to join through again).
    assert await pool.fetchval("SELECT count(*) FROM room_memberships") == 5

    # The kicked room is not picked up again.
    again = await pruner(pool, redis_client).run_pass()
    assert again is not None and again.rows == {}


async def test_a_room_whose_rows_are_locked_is_left_for_the_next_pass(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await learned_room(
        pool, "!busy:x", updated_ts=OLD, protected=False, warden_membership="leave",
        recorded=None,
    )  # fmt: skip
    async with pool.acquire() as conn, conn.transaction():
        # A writer holds one of the room's rows: the pass skips it rather than wait, and
        # does not pick the room again and again (batches of one room).
        await conn.execute(
            "SELECT 1 FROM room_members WHERE room_id = '!busy:x' AND user_id = '@bob:y' FOR UPDATE"
        )
        first = await asyncio.wait_for(pruner(pool, redis_client, batch_size=1).run_pass(), 30)
    assert first is not None and first.complete
    assert await held(pool, "!busy:x") == {**NOTHING, "room_state": 1, "room_members": 1}

    second = await pruner(pool, redis_client, batch_size=1).run_pass()
    assert second is not None and second.rows[("room_state", "deleted")] == 1
    assert await held(pool, "!busy:x") == NOTHING


# --- batches and the lock ---------------------------------------------------------------


async def test_each_statement_changes_at_most_one_batch(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store_verdicts(pool, *((f"$v{i}", OLD + i, True) for i in range(10)))
    for i in range(7):
        await record_delivery(pool, "moderation_actions", f"$m{i}", "done", OLD)
    for i in range(4):
        await learned_room(
            pool, f"!gone{i}:x", updated_ts=OLD, protected=False, warden_membership="leave",
            recorded=None,
        )  # fmt: skip
    counts: dict[str, list[int]] = {}

    def counted(name: str) -> None:
        real = getattr(store, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            n = await real(*args, **kwargs)
            counts.setdefault(name, []).append(n if isinstance(n, int) else len(n))
            return n

        monkeypatch.setattr(store, name, wrapper)

    for name in (
        "prune_verdict_details",
        "delete_final_deliveries",
        "left_rooms",
        "delete_learned_rows",
    ):
        counted(name)

    result = await pruner(pool, redis_client, batch_size=3).run_pass()

    assert result is not None and result.complete
    # Oldest first, three at a time, until a batch comes back short.
    assert counts["prune_verdict_details"] == [3, 3, 3, 1]
    # moderation_actions 3, 3, 1; then webhook_deliveries (none).
    assert sorted(counts["delete_final_deliveries"]) == [0, 1, 3, 3]
    assert counts["left_rooms"] == [3, 1]
    assert max(counts["delete_learned_rows"]) == 3
    assert result.rows[("room_members", "deleted")] == 8
    assert result.rows[("room_state", "deleted")] == 4
    left = await pool.fetchval("SELECT count(*) FROM verdicts WHERE sender <> ''")
    assert left == 0


async def test_only_one_of_two_concurrent_pruners_runs(
    pool: asyncpg.Pool, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store_verdicts(pool, ("$old", OLD, True))
    inside = asyncio.Event()
    go_on = asyncio.Event()
    real = store.prune_verdict_details

    async def held_open(*args: Any, **kwargs: Any) -> int:
        inside.set()
        await go_on.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "prune_verdict_details", held_open)
    first = asyncio.create_task(pruner(pool, redis_client).run_pass())
    await asyncio.wait_for(inside.wait(), 10)

    second = await pruner(pool, redis_client).run_pass()
    assert second is None  # the lock is taken: nothing done
    assert await redis_client.get(redis_keys.retention_last_run()) is None

    go_on.set()
    done = await asyncio.wait_for(first, 30)
    assert done is not None and done.complete and done.rows == {("verdicts", "details"): 1}
    assert await redis_client.exists(redis_keys.retention_lock()) == 0  # released
    assert int(await redis_client.get(redis_keys.retention_last_run())) == NOW


async def test_a_pass_that_loses_its_lock_stops_and_is_not_complete(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await store_verdicts(pool, *((f"$v{i}", OLD + i, True) for i in range(5)))
    p = pruner(pool, redis_client, batch_size=2, batch_pause_seconds=0.05)
    task = asyncio.create_task(p.run_pass())
    # Another process takes over the lock (ours lapsed) while the pass is running.
    while await redis_client.exists(redis_keys.retention_lock()) == 0:
        await asyncio.sleep(0.001)
    await redis_client.set(redis_keys.retention_lock(), "someone-else")
    result = await asyncio.wait_for(task, 30)
    assert result is not None and not result.complete
    assert result.rows[("verdicts", "details")] < 5
    # Its lock is left alone, and no pass is recorded as done.
    assert await redis_client.get(redis_keys.retention_lock()) == b"someone-else"
    assert await redis_client.get(redis_keys.retention_last_run()) is None


async def test_a_stopping_worker_ends_its_pass_after_the_current_batch(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await store_verdicts(pool, *((f"$v{i}", OLD + i, True) for i in range(5)))
    stopping = asyncio.Event()
    stopping.set()
    result = await pruner(pool, redis_client, batch_size=2).run_pass(stopping)
    assert result is not None and not result.complete
    assert result.rows == {("verdicts", "details"): 2}
    assert await redis_client.exists(redis_keys.retention_lock()) == 0  # released
    assert await redis_client.get(redis_keys.retention_last_run()) is None


async def test_a_worker_prunes_when_a_pass_is_due(
    pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    await store_verdicts(pool, ("$old", OLD, True))
    p = pruner(pool, redis_client)
    assert await p.due(3_600_000)  # never ran
    stopping = asyncio.Event()
    task = asyncio.create_task(p.run(stopping, interval_seconds=0.05))
    try:
        await wait_for(lambda: redis_client.exists(redis_keys.retention_last_run()))
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
    old = await raw_verdict(pool, "$old")
    assert old is not None and old["sender"] == ""
    assert not await p.due(3_600_000)  # just ran (the clock is fixed at NOW)
    assert REGISTRY.get_sample_value("warden_retention_last_run_timestamp_seconds") == NOW / 1000
    assert (REGISTRY.get_sample_value("warden_retention_run_seconds_count") or 0) >= 1


async def wait_for(check: Callable[[], Awaitable[Any]], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def test_a_filter_worker_process_prunes_by_default(
    pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    retention_database: str,
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    old_ts = int(time.time() * 1000) - 100 * DAY_MS  # the worker's clock is the real one
    await store_verdicts(pool, ("$old", old_ts, True))
    worker = spawn_service(
        "filter-worker",
        PS_DATABASE=retention_database,
        PS_RETENTION_INTERVAL_MINUTES="0.01",
    )
    await asyncio.to_thread(worker.wait_ready)

    async def cleared() -> bool:
        row = await raw_verdict(pool, "$old")
        return row is not None and row["sender"] == ""

    await wait_for(cleared, 60)
    text = httpx.get(f"{worker.metrics_url}/metrics", timeout=5).text
    assert 'warden_retention_pruned_rows_total{kind="details",table="verdicts"} 1.0' in text
    assert worker.stop() == 0


# --- warden prune -------------------------------------------------------------------


def test_warden_prune_runs_one_pass(retention_database: str) -> None:
    async def setup() -> None:
        p = await asyncpg.create_pool(retention_database, min_size=1, max_size=2)
        assert p is not None
        try:
            await p.execute(f"TRUNCATE {', '.join(TABLES)}")
            await store_verdicts(p, ("$old", OLD, True), ("$new", RECENT, True))
            await record_delivery(p, "webhook_deliveries", "$w", "delivered", OLD)
            await record_media(p, "mxc://x/old", OLD)
            await record_media(p, "mxc://x/new", RECENT)
        finally:
            await p.close()
        r = aioredis.from_url(REDIS_URL)
        await r.flushdb()
        await r.aclose()

    asyncio.run(setup())
    env = {
        **os.environ,
        "PS_DATABASE": retention_database,
        "PS_REDIS_URL": REDIS_URL,
        "PS_RETENTION_BATCH_PAUSE_MS": "0",
    }
    cmd = [sys.executable, "-m", "warden", "prune"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "verdicts details: 1" in done.stdout
    assert "webhook_deliveries deleted: 1" in done.stdout
    assert "media_hashes deleted: 1" in done.stdout
    assert "media_classifications deleted: 1" in done.stdout

    async def check() -> None:
        conn = await asyncpg.connect(retention_database)
        try:
            senders = await conn.fetch("SELECT event_id, sender FROM verdicts ORDER BY event_id")
            assert [(r["event_id"], r["sender"]) for r in senders] == [
                ("$new", "@spammer:evil.example"),
                ("$old", ""),
            ]
            assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
            media = await conn.fetchval("SELECT array_agg(mxc_uri) FROM media_hashes")
            assert media == ["mxc://x/new"]
        finally:
            await conn.close()
        r = aioredis.from_url(REDIS_URL)
        try:
            assert await r.exists(redis_keys.retention_last_run()) == 1
            # Another process holds the lock: nothing done, and that is not a failure.
            await r.set(redis_keys.retention_lock(), "other")
        finally:
            await r.aclose()

    asyncio.run(check())
    busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 0, busy.stderr
    assert "another process is pruning" in busy.stderr
    assert busy.stdout == ""

    async def cleanup() -> None:
        r = aioredis.from_url(REDIS_URL)
        await r.flushdb()
        await r.aclose()

    asyncio.run(cleanup())


def test_warden_prune_reports_an_unreachable_database() -> None:
    env = {
        **os.environ,
        "PS_DATABASE": "postgresql://nobody@127.0.0.1:1/none",
        "PS_REDIS_URL": REDIS_URL,
    }
    done = subprocess.run(
        [sys.executable, "-m", "warden", "prune"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("warden prune: ")

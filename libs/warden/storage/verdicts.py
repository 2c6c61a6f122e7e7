"""The ``verdicts`` table: one row per event ID, first writer wins, never updated.

One exception: a refusal imported from policyserv for a room v1/v2 event ID is stored
unbound (``reference_hash`` NULL, read as ``""``) and bound once, to the content of the
first event asked about under that ID (``lookup_verdicts``). From then on it is like
any other verdict: another event under the same ID is a reused event ID.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import asyncpg
import orjson

from warden.bus.subjects import is_streamed
from warden.policy.verdict import ContentClass, FilterOutcome, Verdict

_COLUMNS = (
    "event_id, room_id, community_id, reference_hash, class, harms, filters, sender,"
    " event_type, origin, first_seen_ts"
)


def _verdict(row: asyncpg.Record) -> Verdict:
    filters = row["filters"]
    if isinstance(filters, str):
        filters = orjson.loads(filters)
    return Verdict(
        event_id=row["event_id"],
        content_class=ContentClass(row["class"]),
        harms=tuple(row["harms"]),
        filters=tuple(FilterOutcome.from_dict(f) for f in filters),
        room_id=row["room_id"],
        community_id=row["community_id"],
        sender=row["sender"],
        event_type=row["event_type"],
        origin=row["origin"],
        reference_hash=row["reference_hash"] or "",  # NULL: unbound (imported)
        first_seen_ts=row["first_seen_ts"],
    )


async def get_verdict(pool: asyncpg.Pool, event_id: str) -> Verdict | None:
    """The stored verdict, or None."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM verdicts WHERE event_id = $1", event_id)
    return _verdict(row) if row else None


async def get_verdicts(pool: asyncpg.Pool, event_ids: Sequence[str]) -> dict[str, Verdict]:
    """The stored verdicts of these event IDs (one query); IDs without one are absent."""
    if not event_ids:
        return {}
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM verdicts WHERE event_id = ANY($1::text[])", list(event_ids)
    )
    return {r["event_id"]: _verdict(r) for r in rows}


async def fetch_verdict_rows(pool: asyncpg.Pool, event_ids: Sequence[str]) -> list[asyncpg.Record]:
    """The stored rows of these event IDs as ``lookup_verdicts`` reads them (one
    ``SELECT``, no writes), for a caller that reads them ahead of ``lookup_verdicts``."""
    if not event_ids:
        return []
    return await pool.fetch(
        f"SELECT {_COLUMNS} FROM verdicts WHERE event_id = ANY($1::text[])",
        list(event_ids),
    )


async def lookup_verdicts(
    pool: asyncpg.Pool,
    asked: Sequence[tuple[str, str, str, str]],
    *,
    rows: Sequence[asyncpg.Record] | None = None,
) -> dict[str, Verdict]:
    """The stored verdicts of the events asked about, binding unbound ones on the way.

    ``asked`` holds ``(event_id, reference_hash, room_id, community_id)`` of each event
    as asked. An unbound verdict (an imported room v1/v2 refusal) is bound to that
    reference hash, room and community, and returned bound. An ordinary lookup is the one
    ``SELECT`` of ``get_verdicts`` (a statement that might write costs PostgreSQL about
    40% more CPU, for rows that exist only after an import); only rows that need binding
    take a second statement. An unbound verdict that a concurrent lookup bound meanwhile
    is absent from the result, as is one asked about without a reference hash: the
    caller judges the event, and its insert loses to the stored row (first writer wins),
    which it reads back (bound by the other lookup; still unbound in the second case, so
    not to be cached).

    ``rows``: that ``SELECT``'s result, read already (``fetch_verdict_rows``, possibly
    for more event IDs than asked here: the others are ignored).
    """
    if not asked:
        return {}
    if rows is None:
        rows = await fetch_verdict_rows(pool, [a[0] for a in asked])
    found: dict[str, Verdict] = {}
    to_bind: list[tuple[str, str, str, str]] = []
    by_id = {a[0]: a for a in asked}
    for row in rows:
        event_id, hash_now, room_now = row["event_id"], row["reference_hash"], row["room_id"]
        if event_id not in by_id:
            continue
        _, hash_asked, room_asked, _ = by_id[event_id]
        if hash_now is not None and not (room_now == "" and room_asked and hash_asked):
            found[event_id] = _verdict(row)  # bound, and nothing to add
        elif hash_asked:
            to_bind.append(by_id[event_id])
    if to_bind:
        found.update(await _bind_verdicts(pool, to_bind))
    return found


async def _bind_verdicts(
    pool: asyncpg.Pool, asked: Sequence[tuple[str, str, str, str]]
) -> dict[str, Verdict]:
    """``lookup_verdicts`` for rows read unbound (or without a room): bind them in one
    statement, which also returns rows another lookup bound meanwhile to the same hash."""
    event_ids = [a[0] for a in asked]
    columns = ", ".join(f"v.{c.strip()}" for c in _COLUMNS.split(","))
    rows = await pool.fetch(
        f"""
        WITH bound AS (
            -- Each row's values by its event ID's place in $1; event_id = ANY keeps the
            -- primary key lookup of get_verdicts.
            UPDATE verdicts v
            SET reference_hash = COALESCE(
                    v.reference_hash, ($2::text[])[array_position($1::text[], v.event_id)]),
                room_id = CASE WHEN v.room_id = ''
                    THEN ($3::text[])[array_position($1::text[], v.event_id)]
                    ELSE v.room_id END,
                community_id = CASE WHEN v.community_id = ''
                    THEN ($4::text[])[array_position($1::text[], v.event_id)]
                    ELSE v.community_id END
            -- Unbound (imported v1/v2 refusals), or imported without a room (policyserv
            -- kept none): the first ask with the same content gives it its room and
            -- community, so check/event_id can answer from it.
            WHERE v.event_id = ANY($1::text[])
                AND ($2::text[])[array_position($1::text[], v.event_id)] <> ''
                AND (v.reference_hash IS NULL OR (v.room_id = ''
                    AND ($3::text[])[array_position($1::text[], v.event_id)] <> ''))
                AND COALESCE(v.reference_hash, ($2::text[])[array_position($1::text[], v.event_id)])
                    = ($2::text[])[array_position($1::text[], v.event_id)]
            RETURNING {columns}
        )
        SELECT * FROM bound
        UNION ALL
        -- The statement's snapshot: rows bound above still read NULL here.
        SELECT {columns} FROM verdicts v
        WHERE v.event_id = ANY($1::text[]) AND v.reference_hash IS NOT NULL
            AND v.event_id NOT IN (SELECT event_id FROM bound)
        """,
        event_ids,
        [a[1] for a in asked],
        [a[2] for a in asked],
        [a[3] for a in asked],
    )
    return {r["event_id"]: _verdict(r) for r in rows}


async def insert_verdicts(
    pool: asyncpg.Pool, verdicts: Sequence[Verdict], *, verdict_log: bool = True
) -> dict[str, Verdict]:
    """Insert many verdicts in one statement (one commit, one fsync); return what won per
    event ID.

    One statement on its own is its own transaction: no ``BEGIN`` and ``COMMIT`` round
    trips (PostgreSQL spends about as much CPU on each as on the insert of a small batch).

    ``ON CONFLICT DO NOTHING`` keeps the first verdict ever written for an event ID. The
    returned mapping holds, for every given ID, either the very ``Verdict`` object passed
    in (when this call inserted it; its ``extra`` went to the outbox column, not the row)
    or the stored row of another writer, read back. ``winner is mine`` therefore tells a
    caller whether its own verdict won.

    A verdict that is not streamed to JetStream (``is_streamed`` with ``verdict_log``: a
    neutral or allowed one while the verdict log is off) goes in as published, without
    outbox extras, so the outbox sweeper never looks at it.
    """
    if not verdicts:
        return {}
    mine: dict[str, Verdict] = {}
    repeated: set[str] = set()
    for v in verdicts:
        if v.event_id in mine:
            repeated.add(v.event_id)
        else:
            mine[v.event_id] = v
    async with pool.acquire() as conn:
        inserted = await conn.fetch(
            """
            INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class,
                harms, filters, sender, event_type, origin, first_seen_ts, outbox_extra,
                published)
            SELECT v.event_id, v.room_id, v.community_id, v.reference_hash, v.class,
                ARRAY(SELECT jsonb_array_elements_text(v.harms)), v.filters, v.sender,
                v.event_type, v.origin, v.first_seen_ts, v.extra, v.published
            FROM jsonb_to_recordset($1::jsonb) AS v(event_id text, room_id text,
                community_id text, reference_hash text, class smallint, harms jsonb,
                filters jsonb, sender text, event_type text, origin text, first_seen_ts bigint,
                extra jsonb, published boolean)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id
            """,
            orjson.dumps(
                [
                    {
                        "event_id": v.event_id,
                        "room_id": v.room_id,
                        "community_id": v.community_id,
                        "reference_hash": v.reference_hash,
                        "class": int(v.content_class),
                        "harms": list(v.harms),
                        # Serialised once per verdict, shared with its reply and message.
                        "filters": orjson.Fragment(v.filters_json),
                        "sender": v.sender,
                        "event_type": v.event_type,
                        "origin": v.origin,
                        "first_seen_ts": v.first_seen_ts,
                        **(
                            {"extra": v.extra, "published": False}
                            if is_streamed(v.content_class, verdict_log=verdict_log)
                            else {"extra": None, "published": True}
                        ),
                    }
                    for v in verdicts
                ]
            ).decode(),
        )
        # What we inserted is what we passed: no need to read it back. An ID given twice
        # in one call is read back too, as which of its rows went in is not ours to know.
        won = {r["event_id"] for r in inserted} - repeated
        winners = {event_id: mine[event_id] for event_id in won}
        lost = [event_id for event_id in mine if event_id not in won]
        if lost:
            # ON CONFLICT waited for the other writer to commit: its row is readable now.
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM verdicts WHERE event_id = ANY($1::text[])", lost
            )
            winners.update((r["event_id"], _verdict(r)) for r in rows)
    return winners


Executor = asyncpg.Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


async def mark_published(db: Executor, event_ids: Sequence[str]) -> None:
    """Record that these verdicts reached JetStream; drop their outbox extras.

    ``db`` may be a pool or a connection inside the caller's transaction.
    """
    if event_ids:
        await db.execute(
            "UPDATE verdicts SET published = TRUE, outbox_extra = NULL"
            " WHERE event_id = ANY($1::text[]) AND NOT published",
            list(event_ids),
        )


async def claim_unpublished(
    db: Executor,
    *,
    older_than_ts: int,
    limit: int,
    lease_ms: int,
) -> list[Verdict]:
    """Claim unpublished verdicts first seen before ``older_than_ts`` for ``lease_ms``.

    One statement, committed on its own: the claimed rows are leased (not locked) so the
    caller publishes them with no transaction open; rows another sweeper leased, or is
    claiming right now, are skipped. Each verdict carries its outbox extras in ``extra``.
    """
    now = int(time.time() * 1000)
    rows = await db.fetch(
        f"""
        UPDATE verdicts SET outbox_claimed_until = $3 + $4
        WHERE event_id IN (
            SELECT event_id FROM verdicts
            WHERE NOT published AND first_seen_ts < $1 AND outbox_claimed_until <= $3
            ORDER BY first_seen_ts
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        RETURNING {_COLUMNS}, outbox_extra
        """,
        older_than_ts,
        limit,
        now,
        lease_ms,
    )
    out = []
    for row in sorted(rows, key=lambda r: r["first_seen_ts"]):
        extra = row["outbox_extra"]
        if isinstance(extra, str):
            extra = orjson.loads(extra)
        out.append(dataclasses.replace(_verdict(row), extra=dict(extra or {})))
    return out


async def release_unpublished(db: Executor, event_ids: Sequence[str]) -> None:
    """End the outbox lease of verdicts whose publication failed, for the next sweep."""
    if event_ids:
        await db.execute(
            "UPDATE verdicts SET outbox_claimed_until = 0"
            " WHERE event_id = ANY($1::text[]) AND NOT published",
            list(event_ids),
        )


# The outbox backlog count stops here, so measuring a huge backlog stays a bounded scan
# of the partial index ``verdicts_unpublished``.
OUTBOX_BACKLOG_COUNT_CAP = 100_000


async def outbox_backlog(db: Executor) -> tuple[int, int | None]:
    """Unpublished verdicts (at most ``OUTBOX_BACKLOG_COUNT_CAP``) and the oldest's
    ``first_seen_ts`` (None when there are none)."""
    row = await db.fetchrow(
        "SELECT count(*) AS n, min(first_seen_ts) AS oldest FROM ("
        " SELECT first_seen_ts FROM verdicts WHERE NOT published LIMIT $1) AS backlog",
        OUTBOX_BACKLOG_COUNT_CAP,
    )
    assert row is not None
    return int(row["n"]), row["oldest"]

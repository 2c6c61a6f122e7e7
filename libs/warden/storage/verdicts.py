"""The ``verdicts`` table: one row per event ID, first writer wins, never updated."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson

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
        reference_hash=row["reference_hash"],
        first_seen_ts=row["first_seen_ts"],
    )


async def get_verdict(pool: asyncpg.Pool, event_id: str) -> Verdict | None:
    """The stored verdict, or None."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM verdicts WHERE event_id = $1", event_id)
    return _verdict(row) if row else None


async def insert_verdicts(pool: asyncpg.Pool, verdicts: Sequence[Verdict]) -> dict[str, Verdict]:
    """Insert many verdicts in one transaction (one fsync); return what won per event ID.

    ``ON CONFLICT DO NOTHING`` keeps the first verdict ever written for an event ID; the
    returned mapping holds the stored row for every given ID, which may be another
    writer's verdict rather than the one passed in.
    """
    if not verdicts:
        return {}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO verdicts (event_id, room_id, community_id, reference_hash, class,
                harms, filters, sender, event_type, origin, first_seen_ts)
            SELECT v.event_id, v.room_id, v.community_id, v.reference_hash, v.class,
                ARRAY(SELECT jsonb_array_elements_text(v.harms)), v.filters, v.sender,
                v.event_type, v.origin, v.first_seen_ts
            FROM jsonb_to_recordset($1::jsonb) AS v(event_id text, room_id text,
                community_id text, reference_hash text, class smallint, harms jsonb,
                filters jsonb, sender text, event_type text, origin text, first_seen_ts bigint)
            ON CONFLICT (event_id) DO NOTHING
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
                        "filters": [f.to_dict() for f in v.filters],
                        "sender": v.sender,
                        "event_type": v.event_type,
                        "origin": v.origin,
                        "first_seen_ts": v.first_seen_ts,
                    }
                    for v in verdicts
                ]
            ).decode(),
        )
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM verdicts WHERE event_id = ANY($1::text[])",
            [v.event_id for v in verdicts],
        )
    return {r["event_id"]: _verdict(r) for r in rows}

"""Retention: the pruning statements, each bounded to one batch of rows.

Every function here runs one statement that changes at most ``limit`` rows and returns
how many it changed; ``warden.retention`` calls them until a batch comes back short,
pausing between batches. Rows are picked with ``FOR UPDATE SKIP LOCKED`` so a batch never
waits on a row a service is writing.

What is kept and what goes:

- ``verdicts``: the *details* (``sender``, ``origin``, the filter outcomes ``filters``
  but for the sender-unverified mark, and the outbox extras ``outbox_extra``, which hold
  the body excerpt) are cleared from verdicts first seen before a cutoff; the *minimal
  verdict* (event ID, class, harms, reference hash, with the room, community and event
  type) stays, so the event keeps its answer. Minimal verdicts are deleted only before
  a second cutoff, off by default. Unpublished verdicts (the outbox) are never touched:
  their sweeper needs them whole.
- ``webhook_deliveries`` and ``moderation_actions``: final rows (delivered, done,
  failed) last updated before a cutoff are deleted; pending ones (in flight, or to be
  retried) never.
- learned state (``room_state_events``, ``room_members``, ``displaynames``,
  ``room_state``) of rooms Warden left: see ``left_rooms``.
- media scan results: ``media_hashes`` rows scanned, and ``media_classifications`` rows
  judged, before a cutoff are deleted (the media is scanned again if asked about again,
  against the banks of that day).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from warden.policy.verdict import SENDER_UNVERIFIED

# The same predicate as the partial index verdicts_details_ts (migration 0014), written
# out so that the planner can use the index.
_HAS_DETAILS = "(sender <> '' OR origin <> '')"


def _count(status: str) -> int:
    """The row count of an ``UPDATE n`` / ``DELETE n`` command status."""
    return int(status.rsplit(" ", 1)[-1])


async def prune_verdict_details(pool: asyncpg.Pool, *, before_ts: int, limit: int) -> int:
    """Clear sender, origin, filter outcomes (the sender-unverified mark stays, so
    ``Verdict.sender_verified`` keeps its answer) and outbox extras of up to ``limit``
    published verdicts first seen before ``before_ts`` (ms), oldest first."""
    status = await pool.execute(
        f"""
        UPDATE verdicts v
        SET sender = '', origin = '', outbox_extra = NULL,
            -- Only the sender-unverified mark stays: it is not about anyone, and without
            -- it the verdict would read as attributed to its (unknown) sender.
            filters = COALESCE((
                SELECT jsonb_agg(f) FROM jsonb_array_elements(v.filters) AS f
                WHERE f->>'name' = $3
            ), '[]'::jsonb)
        FROM (
            SELECT event_id FROM verdicts
            WHERE {_HAS_DETAILS} AND first_seen_ts < $1 AND published
            ORDER BY first_seen_ts
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ) AS batch
        WHERE v.event_id = batch.event_id
        """,
        before_ts,
        limit,
        SENDER_UNVERIFIED,
    )
    return _count(status)


async def delete_verdicts(pool: asyncpg.Pool, *, before_ts: int, limit: int) -> int:
    """Delete up to ``limit`` published verdicts first seen before ``before_ts`` (ms).

    No ORDER BY: the BRIN index finds old rows but does not sort them, and sorting every
    old row for each batch would cost more than the batch.
    """
    status = await pool.execute(
        """
        DELETE FROM verdicts WHERE event_id IN (
            SELECT event_id FROM verdicts
            WHERE first_seen_ts < $1 AND published
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        """,
        before_ts,
        limit,
    )
    return _count(status)


# Final statuses per table: rows in any other status are in flight and kept.
FINAL_STATUSES = {
    "webhook_deliveries": ("delivered", "failed"),
    "moderation_actions": ("done", "failed"),
}


async def delete_final_deliveries(
    pool: asyncpg.Pool, table: str, *, before_ts: int, limit: int
) -> int:
    """Delete up to ``limit`` final rows of ``table`` (``webhook_deliveries`` or
    ``moderation_actions``) last updated before ``before_ts`` (ms)."""
    statuses = list(FINAL_STATUSES[table])  # KeyError for any other table name
    status = await pool.execute(
        f"""
        DELETE FROM {table} WHERE event_id IN (
            SELECT event_id FROM {table}
            WHERE status = ANY($3::text[]) AND updated_ts < $1
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        """,
        before_ts,
        limit,
        statuses,
    )
    return _count(status)


async def left_rooms(
    pool: asyncpg.Pool, *, before_ts: int, limit: int, after: tuple[int, str] = (-1, "")
) -> list[tuple[int, str]]:
    """Up to ``limit`` rooms Warden left whose learned state is still held and has not
    changed since ``before_ts`` (ms), as ``(updated_ts, room_id)`` in that order, from
    just past ``after`` (the last of the previous batch: a room whose rows could not all
    be deleted is not picked again in the same pass).

    A room is *left* when Warden no longer protects it (no ``rooms`` row) or its learned
    membership is 'leave' or 'ban', and no join of Warden's is recorded for it
    (``room_memberships``: an unprotected room Warden is still in keeps its state, ready
    for protecting it again), nor a leave newer than the cutoff. A protected room Warden
    was kicked from keeps its ``room_state`` row (its membership is what makes ``/sign``
    refuse it), so it counts only while it still holds members, names or events.
    """
    rows = await pool.fetch(
        """
        SELECT s.updated_ts, s.room_id FROM room_state s
        LEFT JOIN rooms r ON r.room_id = s.room_id
        WHERE s.updated_ts < $1
          AND (r.room_id IS NULL OR s.warden_membership IN ('leave', 'ban'))
          AND NOT EXISTS (
              SELECT 1 FROM room_memberships m
              WHERE m.room_id = s.room_id AND (m.membership = 'join' OR m.updated_ts >= $1)
          )
          AND (r.room_id IS NULL
               OR s.member_count > 0 OR s.displayname_count > 0 OR s.rule_count > 0
               OR EXISTS (SELECT 1 FROM room_state_events e WHERE e.room_id = s.room_id)
               OR EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = s.room_id)
               OR EXISTS (SELECT 1 FROM displaynames d WHERE d.room_id = s.room_id))
          AND (s.updated_ts, s.room_id) > ($3, $4)
        ORDER BY s.updated_ts, s.room_id
        LIMIT $2
        """,
        before_ts,
        limit,
        after[0],
        after[1],
    )
    return [(r["updated_ts"], r["room_id"]) for r in rows]


# The per-room tables of learned state, pruned in this order (room_state last).
LEARNED_STATE_TABLES = ("room_state_events", "room_members", "displaynames")

# A room_state row whose rooms' rows are all gone (a pass cut short leaves some).
_NOTHING_LEFT = " ".join(
    f"AND NOT EXISTS (SELECT 1 FROM {t} x WHERE x.room_id = s.room_id)"
    for t in LEARNED_STATE_TABLES
)


async def delete_learned_rows(
    pool: asyncpg.Pool, table: str, room_ids: Sequence[str], *, before_ts: int, limit: int
) -> int:
    """Delete up to ``limit`` rows of ``table`` (one of ``LEARNED_STATE_TABLES``) of these
    rooms, if their state still has not changed since ``before_ts`` (a room joined again
    meanwhile was seeded afresh, which touched ``room_state.updated_ts``)."""
    if table not in LEARNED_STATE_TABLES:
        raise ValueError(f"not a learned-state table: {table}")
    status = await pool.execute(
        f"""
        DELETE FROM {table} WHERE ctid = ANY(ARRAY(
            SELECT t.ctid FROM {table} t
            JOIN room_state s ON s.room_id = t.room_id AND s.updated_ts < $2
            WHERE t.room_id = ANY($1::text[])
            LIMIT $3
            FOR UPDATE OF t SKIP LOCKED
        ))
        """,
        list(room_ids),
        before_ts,
        limit,
    )
    return _count(status)


async def finish_left_rooms(pool: asyncpg.Pool, room_ids: Sequence[str], *, before_ts: int) -> int:
    """Once their rows are gone: delete the ``room_state`` rows of these rooms that are
    not protected, and zero the counters of those that are (kicked or banned: the row,
    with the membership, stays). A room with rows left is skipped. Returns the rows
    deleted. ``len(room_ids)`` is at most
    one batch, so this is one bounded statement."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            f"""
            UPDATE room_state s SET member_count = 0, displayname_count = 0, rule_count = 0
            WHERE s.room_id = ANY($1::text[]) AND s.updated_ts < $2
              AND EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = s.room_id)
              {_NOTHING_LEFT}
            """,
            list(room_ids),
            before_ts,
        )
        status = await conn.execute(
            f"""
            DELETE FROM room_state s
            WHERE s.room_id = ANY($1::text[]) AND s.updated_ts < $2
              AND NOT EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = s.room_id)
              {_NOTHING_LEFT}
            """,
            list(room_ids),
            before_ts,
        )
    return _count(status)


# The media scan tables and the column holding when each row was written (ms).
MEDIA_TABLES = {"media_hashes": "ts", "media_classifications": "classified_ts"}


async def delete_old_media(pool: asyncpg.Pool, table: str, *, before_ts: int, limit: int) -> int:
    """Delete up to ``limit`` rows of ``table`` (one of ``MEDIA_TABLES``) written before
    ``before_ts`` (ms)."""
    column = MEDIA_TABLES[table]  # KeyError for any other table name
    status = await pool.execute(
        f"""
        DELETE FROM {table} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {table} WHERE {column} < $1
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        ))
        """,
        before_ts,
        limit,
    )
    return _count(status)

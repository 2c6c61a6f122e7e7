"""The moderation command queue: ``moderation_command_destinations`` and ``_edus``.

A destination is sent to by one sender at a time across replicas: ``claim`` sets
``claimed_by``/``claim_until`` in one statement, and only the claimer's ``complete`` or
``fail`` releases it (a crashed sender's claim runs out after its lease). The
transaction ID and its EDU IDs are committed before anything is sent, so a retry, by
this process or another after a restart, sends the same transaction again.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

import asyncpg

EnqueueOutcome = Literal["queued", "duplicate", "queue_full"]
DESTINATION_STATES = ("idle", "pending", "sending", "backoff")


@dataclass(frozen=True)
class Claim:
    """A claimed destination and the transaction to send to it."""

    destination: str
    txn_id: str
    edus: list[str]  # each EDU's JSON, oldest first
    failures: int  # consecutive failures before this attempt
    retry: bool  # True when this transaction was tried before


def new_txn_id(now_ms: int) -> str:
    """A transaction ID: time-ordered (ms, hex) plus randomness, like a KSUID."""
    return f"wmc{now_ms:x}{secrets.token_hex(6)}"


async def enqueue(
    pool: asyncpg.Pool,
    *,
    destination: str,
    event_id: str,
    edu_json: str,
    now_ms: int,
    max_queued: int,
) -> EnqueueOutcome:
    """Queue one EDU for ``destination`` unless the same event is queued already, or
    was sent there already (``moderation_commands_sent``: a redelivered verdict).

    Refused (``queue_full``) when the destination already has ``max_queued`` EDUs.
    """
    async with pool.acquire() as conn, conn.transaction():
        # Locks the destination row: concurrent enqueues count the queue in turn.
        await conn.execute(
            """
            INSERT INTO moderation_command_destinations (destination) VALUES ($1)
            ON CONFLICT (destination) DO UPDATE SET destination = EXCLUDED.destination
            """,
            destination,
        )
        queued = await conn.fetchval(
            "SELECT count(*) FROM moderation_command_edus WHERE destination = $1", destination
        )
        sent = await conn.fetchval(
            "SELECT 1 FROM moderation_commands_sent WHERE destination = $1 AND event_id = $2",
            destination,
            event_id,
        )
        if sent is not None:
            return "duplicate"
        if queued >= max_queued:
            return "queue_full"
        inserted = await conn.fetchval(
            """
            INSERT INTO moderation_command_edus (destination, event_id, edu, created_ts)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (destination, event_id) DO NOTHING
            RETURNING id
            """,
            destination,
            event_id,
            edu_json,
            now_ms,
        )
    return "queued" if inserted is not None else "duplicate"


async def due_destinations(pool: asyncpg.Pool, now_ms: int, limit: int) -> list[str]:
    """Unclaimed destinations with something to send and no backoff pending."""
    rows = await pool.fetch(
        """
        SELECT d.destination FROM moderation_command_destinations d
        WHERE d.claim_until <= $1 AND d.next_attempt_ts <= $1
          AND (d.txn_id IS NOT NULL OR EXISTS (
                SELECT 1 FROM moderation_command_edus e WHERE e.destination = d.destination))
        ORDER BY d.next_attempt_ts
        LIMIT $2
        """,
        now_ms,
        limit,
    )
    return [r["destination"] for r in rows]


async def next_attempt_at(pool: asyncpg.Pool, now_ms: int) -> int | None:
    """The earliest future time (ms) a backed-off or claimed destination becomes due."""
    value = await pool.fetchval(
        """
        SELECT min(greatest(next_attempt_ts, claim_until)) FROM moderation_command_destinations
        WHERE greatest(next_attempt_ts, claim_until) > $1
          AND (txn_id IS NOT NULL OR failures > 0)
        """,
        now_ms,
    )
    return int(value) if value is not None else None


async def claim(
    pool: asyncpg.Pool,
    destination: str,
    *,
    owner: str,
    now_ms: int,
    lease_ms: int,
    batch: int,
) -> Claim | None:
    """Claim ``destination`` and return the transaction to send, or None.

    None when another sender holds it, it is backing off, or nothing is queued. A
    transaction already in flight is returned as it was (same ID, same EDUs, minus any
    the retention dropped); otherwise up to ``batch`` of the oldest EDUs form a new one.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            UPDATE moderation_command_destinations
            SET claimed_by = $2, claim_until = $3
            WHERE destination = $1 AND claim_until <= $4 AND next_attempt_ts <= $4
            RETURNING txn_id, txn_edu_ids, failures
            """,
            destination,
            owner,
            now_ms + lease_ms,
            now_ms,
        )
        if row is None:
            return None
        txn_id: str | None = row["txn_id"]
        if txn_id is not None:
            edus = await conn.fetch(
                "SELECT edu FROM moderation_command_edus WHERE id = ANY($1::bigint[]) ORDER BY id",
                row["txn_edu_ids"],
            )
            if edus:
                return Claim(destination, txn_id, [r["edu"] for r in edus], row["failures"], True)
        edus = await conn.fetch(
            """
            SELECT id, edu FROM moderation_command_edus WHERE destination = $1
            ORDER BY id LIMIT $2
            """,
            destination,
            batch,
        )
        if not edus:
            await conn.execute(
                """
                UPDATE moderation_command_destinations
                SET claimed_by = '', claim_until = 0, txn_id = NULL, txn_edu_ids = '{}'
                WHERE destination = $1
                """,
                destination,
            )
            return None
        txn_id = new_txn_id(now_ms)
        await conn.execute(
            """
            UPDATE moderation_command_destinations SET txn_id = $2, txn_edu_ids = $3::bigint[]
            WHERE destination = $1
            """,
            destination,
            txn_id,
            [r["id"] for r in edus],
        )
        return Claim(destination, txn_id, [r["edu"] for r in edus], row["failures"], False)


async def complete(
    pool: asyncpg.Pool, destination: str, *, owner: str, txn_id: str, now_ms: int
) -> int:
    """The destination accepted ``txn_id``: drop its EDUs, release the claim.

    Returns how many EDUs were dropped (0 when the claim was lost meanwhile).
    """
    async with pool.acquire() as conn, conn.transaction():
        ids = await conn.fetchval(
            """
            SELECT txn_edu_ids FROM moderation_command_destinations
            WHERE destination = $1 AND claimed_by = $2 AND txn_id = $3
            FOR UPDATE
            """,
            destination,
            owner,
            txn_id,
        )
        if ids is None:
            return 0
        await conn.execute(
            """
            UPDATE moderation_command_destinations
            SET txn_id = NULL, txn_edu_ids = '{}', last_txn_id = $2, failures = 0,
                next_attempt_ts = 0, last_error = '', last_success_ts = $3,
                claimed_by = '', claim_until = 0
            WHERE destination = $1
            """,
            destination,
            txn_id,
            now_ms,
        )
        # Remembered before the rows go, so a redelivered verdict is not queued again.
        await conn.execute(
            """
            INSERT INTO moderation_commands_sent (destination, event_id, sent_ts)
            SELECT destination, event_id, $2 FROM moderation_command_edus
            WHERE id = ANY($1::bigint[])
            ON CONFLICT DO NOTHING
            """,
            ids,
            now_ms,
        )
        result = await conn.execute(
            "DELETE FROM moderation_command_edus WHERE id = ANY($1::bigint[])", ids
        )
    return int(result.split()[-1])


async def fail(
    pool: asyncpg.Pool, destination: str, *, owner: str, next_attempt_ts: int, error: str
) -> None:
    """An attempt failed: keep the transaction, back off until ``next_attempt_ts``."""
    await pool.execute(
        """
        UPDATE moderation_command_destinations
        SET failures = failures + 1, next_attempt_ts = $3, last_error = $4,
            claimed_by = '', claim_until = 0
        WHERE destination = $1 AND claimed_by = $2
        """,
        destination,
        owner,
        next_attempt_ts,
        error[:500],
    )


async def expire(pool: asyncpg.Pool, *, cutoff_ms: int, now_ms: int) -> int:
    """Drop EDUs created before ``cutoff_ms``, and the record of commands sent before
    it; return how many EDUs.

    An EDU in a transaction in flight stays while any EDU of that transaction is
    younger (its retries must resend the same content); once all are older and the
    destination is not being sent to, the whole transaction is dropped.
    """
    async with pool.acquire() as conn, conn.transaction():
        # What was sent is remembered as long as a redelivered verdict could requeue it.
        await conn.execute("DELETE FROM moderation_commands_sent WHERE sent_ts < $1", cutoff_ms)
        loose = await conn.execute(
            """
            DELETE FROM moderation_command_edus e
            USING moderation_command_destinations d
            WHERE e.destination = d.destination AND e.created_ts < $1
              AND NOT (e.id = ANY(d.txn_edu_ids))
            """,
            cutoff_ms,
        )
        stale = await conn.fetch(
            """
            SELECT destination, txn_edu_ids FROM moderation_command_destinations d
            WHERE txn_id IS NOT NULL AND claim_until <= $2
              AND NOT EXISTS (SELECT 1 FROM moderation_command_edus e
                              WHERE e.id = ANY(d.txn_edu_ids) AND e.created_ts >= $1)
            FOR UPDATE SKIP LOCKED
            """,
            cutoff_ms,
            now_ms,
        )
        dropped = int(loose.split()[-1])
        for row in stale:
            result = await conn.execute(
                "DELETE FROM moderation_command_edus WHERE id = ANY($1::bigint[])",
                row["txn_edu_ids"],
            )
            dropped += int(result.split()[-1])
            await conn.execute(
                """
                UPDATE moderation_command_destinations SET txn_id = NULL, txn_edu_ids = '{}'
                WHERE destination = $1
                """,
                row["destination"],
            )
    return dropped


async def destination_states(pool: asyncpg.Pool, now_ms: int) -> tuple[dict[str, int], int]:
    """Destinations per state (``DESTINATION_STATES``) and the number of EDUs queued."""
    rows = await pool.fetch(
        """
        SELECT CASE
                 WHEN d.claim_until > $1 THEN 'sending'
                 WHEN d.next_attempt_ts > $1 THEN 'backoff'
                 WHEN d.txn_id IS NOT NULL OR EXISTS (
                   SELECT 1 FROM moderation_command_edus e WHERE e.destination = d.destination)
                   THEN 'pending'
                 ELSE 'idle'
               END AS state,
               count(*) AS n
        FROM moderation_command_destinations d GROUP BY 1
        """,
        now_ms,
    )
    states = dict.fromkeys(DESTINATION_STATES, 0)
    states.update({r["state"]: int(r["n"]) for r in rows})
    queued = await pool.fetchval("SELECT count(*) FROM moderation_command_edus")
    return states, int(queued)

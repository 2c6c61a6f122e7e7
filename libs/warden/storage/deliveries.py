"""The ``webhook_deliveries`` and ``moderation_actions`` tables (migration 0003).

One row per event ID and side effect. The services read the row before acting, so a
JetStream redelivery of an event already handled (delivered, redacted, or given up on)
does nothing; they write it after each attempt. ``attempts`` only ever grows.

Webhooks also claim the row before each POST (``claim_webhook_delivery``, migration
0007), so two messages for the same event never POST at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import asyncpg

WebhookStatus = Literal["pending", "delivered", "failed"]
ModerationStatus = Literal["pending", "done", "failed"]

# Errors are recorded for operators; they come from remote servers, so keep them short.
MAX_ERROR_CHARS = 500


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class DeliveryRecord:
    """What is known about one side effect for one event."""

    event_id: str
    status: str
    attempts: int
    last_error: str
    updated_ts: int

    @property
    def final(self) -> bool:
        """True once nothing more will be tried (done, delivered or failed)."""
        return self.status != "pending"


def _record(row: asyncpg.Record) -> DeliveryRecord:
    return DeliveryRecord(
        event_id=row["event_id"],
        status=row["status"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        updated_ts=row["updated_ts"],
    )


async def get_webhook_delivery(pool: asyncpg.Pool, event_id: str) -> DeliveryRecord | None:
    """The webhook delivery row for ``event_id``, or None if never attempted."""
    row = await pool.fetchrow(
        "SELECT event_id, status, attempts, last_error, updated_ts"
        " FROM webhook_deliveries WHERE event_id = $1",
        event_id,
    )
    return _record(row) if row else None


async def claim_webhook_delivery(
    pool: asyncpg.Pool,
    *,
    event_id: str,
    community_id: str,
    url_host: str,
    stream_sequence: int,
    attempt: int,
    lease_ms: int,
) -> bool:
    """Claim the right to POST ``event_id``'s webhook now; True if this message has it.

    One statement, so two messages racing for the same event cannot both win. The claim
    is taken when there is no row yet, or the row is still pending and either its claim
    has lapsed or it is held by an earlier delivery of this same message (a redelivery
    after a crash or a retry). A final row, or a live claim of another message, refuses.
    """
    now = _now_ms()
    row = await pool.fetchval(
        """
        INSERT INTO webhook_deliveries
            (event_id, community_id, url_host, status, attempts, last_error, updated_ts,
             claim_seq, claim_attempt, claimed_until)
        VALUES ($1, $2, $3, 'pending', 0, '', $4, $5, $6, $7)
        ON CONFLICT (event_id) DO UPDATE SET
            claim_seq = EXCLUDED.claim_seq,
            claim_attempt = EXCLUDED.claim_attempt,
            claimed_until = EXCLUDED.claimed_until
        WHERE webhook_deliveries.status = 'pending'
          AND (webhook_deliveries.claimed_until <= $4
               OR webhook_deliveries.claim_seq IS NULL
               OR (webhook_deliveries.claim_seq = EXCLUDED.claim_seq
                   AND webhook_deliveries.claim_attempt < EXCLUDED.claim_attempt))
        RETURNING 1
        """,
        event_id,
        community_id,
        url_host,
        now,
        stream_sequence,
        attempt,
        now + lease_ms,
    )
    return row is not None


async def release_webhook_claim(pool: asyncpg.Pool, event_id: str, stream_sequence: int) -> None:
    """Give up this message's claim without a POST: a row never attempted goes away."""
    await pool.execute(
        "DELETE FROM webhook_deliveries WHERE event_id = $1 AND status = 'pending'"
        " AND claim_seq = $2 AND attempts = 0",
        event_id,
        stream_sequence,
    )
    await pool.execute(
        "UPDATE webhook_deliveries SET claim_seq = NULL, claimed_until = 0"
        " WHERE event_id = $1 AND status = 'pending' AND claim_seq = $2",
        event_id,
        stream_sequence,
    )


async def record_webhook_delivery(
    pool: asyncpg.Pool,
    *,
    event_id: str,
    community_id: str,
    url_host: str,
    status: WebhookStatus,
    attempts: int,
    last_error: str = "",
    claim_seq: int | None = None,
    claimed_until: int = 0,
) -> None:
    """Insert or update the row; a final status is never downgraded to pending.

    With ``claim_seq``, a claim held by that message is kept until ``claimed_until``
    (ms): a pending delivery stays reserved for its message's retry.
    """
    await pool.execute(
        """
        INSERT INTO webhook_deliveries
            (event_id, community_id, url_host, status, attempts, last_error, updated_ts,
             claim_seq, claimed_until)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (event_id) DO UPDATE SET
            url_host = EXCLUDED.url_host,
            status = EXCLUDED.status,
            attempts = GREATEST(webhook_deliveries.attempts, EXCLUDED.attempts),
            last_error = EXCLUDED.last_error,
            updated_ts = EXCLUDED.updated_ts,
            claimed_until = CASE WHEN webhook_deliveries.claim_seq = EXCLUDED.claim_seq
                THEN EXCLUDED.claimed_until ELSE webhook_deliveries.claimed_until END
        WHERE webhook_deliveries.status = 'pending'
        """,
        event_id,
        community_id,
        url_host,
        status,
        attempts,
        last_error[:MAX_ERROR_CHARS],
        _now_ms(),
        claim_seq,
        claimed_until,
    )


async def get_moderation_action(pool: asyncpg.Pool, event_id: str) -> DeliveryRecord | None:
    """The moderation row for ``event_id``, or None if never attempted."""
    row = await pool.fetchrow(
        "SELECT event_id, status, attempts, last_error, updated_ts"
        " FROM moderation_actions WHERE event_id = $1",
        event_id,
    )
    return _record(row) if row else None


async def record_moderation_action(
    pool: asyncpg.Pool,
    *,
    event_id: str,
    room_id: str,
    action: str,
    moderator_user_id: str,
    status: ModerationStatus,
    attempts: int,
    last_error: str = "",
) -> None:
    """Insert or update the row; a final status is never downgraded to pending."""
    await pool.execute(
        """
        INSERT INTO moderation_actions
            (event_id, room_id, action, moderator_user_id, status, attempts, last_error,
             updated_ts)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (event_id) DO UPDATE SET
            status = EXCLUDED.status,
            attempts = GREATEST(moderation_actions.attempts, EXCLUDED.attempts),
            last_error = EXCLUDED.last_error,
            updated_ts = EXCLUDED.updated_ts
        WHERE moderation_actions.status = 'pending'
        """,
        event_id,
        room_id,
        action,
        moderator_user_id,
        status,
        attempts,
        last_error[:MAX_ERROR_CHARS],
        _now_ms(),
    )

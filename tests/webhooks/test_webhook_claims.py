"""The webhook delivery claim (review L10) against real PostgreSQL.

One statement decides which message may POST an event's webhook: a second message is
refused while the claim is live, a redelivery of the holder may take it again, a lapsed
claim may be taken over, and a final row refuses everyone.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from warden.storage import deliveries


async def claim(pool: asyncpg.Pool, event_id: str, seq: int, attempt: int, lease_ms: int) -> bool:
    return await deliveries.claim_webhook_delivery(
        pool,
        event_id=event_id,
        community_id="c",
        url_host="localhost",
        stream_sequence=seq,
        attempt=attempt,
        lease_ms=lease_ms,
    )


async def test_only_one_of_many_concurrent_messages_gets_the_claim(pg_pool: asyncpg.Pool) -> None:
    event_id = f"${uuid.uuid4().hex}"
    won = await asyncio.gather(*(claim(pg_pool, event_id, seq, 1, 60_000) for seq in range(20)))
    assert won.count(True) == 1


async def test_redelivery_of_the_holder_reclaims_and_others_wait_for_the_lapse(
    pg_pool: asyncpg.Pool,
) -> None:
    event_id = f"${uuid.uuid4().hex}"
    assert await claim(pg_pool, event_id, 7, 1, 60_000)
    assert not await claim(pg_pool, event_id, 8, 1, 60_000)  # another message
    assert not await claim(pg_pool, event_id, 7, 1, 60_000)  # the same delivery again
    assert await claim(pg_pool, event_id, 7, 2, 60_000)  # its redelivery

    other = f"${uuid.uuid4().hex}"
    assert await claim(pg_pool, other, 7, 1, 0)  # a claim that has already lapsed
    assert await claim(pg_pool, other, 8, 1, 60_000)  # is taken over


async def test_final_rows_refuse_and_released_untried_claims_vanish(pg_pool: asyncpg.Pool) -> None:
    done = f"${uuid.uuid4().hex}"
    assert await claim(pg_pool, done, 1, 1, 60_000)
    await deliveries.record_webhook_delivery(
        pg_pool,
        event_id=done,
        community_id="c",
        url_host="localhost",
        status="delivered",
        attempts=1,
    )
    assert not await claim(pg_pool, done, 1, 2, 0)
    assert not await claim(pg_pool, done, 2, 1, 0)

    released = f"${uuid.uuid4().hex}"
    assert await claim(pg_pool, released, 1, 1, 60_000)
    await deliveries.release_webhook_claim(pg_pool, released, 1)
    row: Any = await deliveries.get_webhook_delivery(pg_pool, released)
    assert row is None
    assert await claim(pg_pool, released, 2, 1, 60_000)

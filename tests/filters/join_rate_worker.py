"""A stand-alone filter pipeline process for the join-rate test: its own Redis and
PostgreSQL connections, judging joins of one room as a worker would.

``python -m tests.filters.join_rate_worker <pg_url> <redis_url> <room_id> <max_joins>
<go_key> <user>...``: prints ``ready``, waits until ``go_key`` gets an entry (so the
processes start together), judges one join per user and prints one JSON line
``{"<event_id>": "<class>"}``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import asyncpg
import orjson
import redis.asyncio as aioredis

from tests.filters.filter_helpers import OWN_USER, config, event
from warden.filters.base import FilterDeps
from warden.policy.pipeline import Pipeline


async def main(pg_url: str, redis_url: str, room: str, limit: str, go: str, *users: str) -> None:
    redis = aioredis.from_url(redis_url)
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    try:
        pipeline = Pipeline(
            FilterDeps(redis=redis, pool=pool, local_user_id=OWN_USER), timeout_seconds=10
        )
        cfg = config(join_rate_filter_max_joins_per_minute=int(limit), hellban_postfilter_minutes=0)
        print("ready", flush=True)
        await redis.blpop([go], timeout=60)
        joins = [
            (
                f"${uuid.uuid4().hex}",
                event("m.room.member", {"membership": "join"}, sender=u, room_id=room, state_key=u),
            )
            for u in users
        ]
        verdicts = await asyncio.gather(
            *(
                pipeline.evaluate(ev, event_id=eid, community_id="default", config=cfg)
                for eid, ev in joins
            )
        )
        out = {v.event_id: v.content_class.label for v in verdicts}
        print(orjson.dumps(out).decode(), flush=True)
    finally:
        await pool.close()
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))

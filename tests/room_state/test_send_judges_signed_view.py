"""The ``/send`` judge path (review H5): an event that bypassed the policy server and is
relayed with 12 KB of ``unsigned`` is judged as its hashes cover it, by the real
evaluation service and pipeline, so the relay cannot get it refused."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.gateway.policy_harness import new_room_id
from tests.room_state.test_room_state_consumer import (
    OUR_USER,
    delivery,
    make_consumer,
    start_origin,
)
from warden import redis_keys
from warden.bus.consumer import ACK
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import EVALUATE_SUBJECT
from warden.federation.keyring import Keyring
from warden.filters.base import FilterDeps
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden.runtime.identity import Identity
from warden.storage import room_state
from warden.storage.rooms import put_room
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


async def test_a_relayed_event_padded_in_unsigned_is_judged_without_the_padding(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    origin = await start_origin(https_server)
    room = await put_room(pg_pool, new_room_id("10"), "10", "default")
    rid = room.room_id
    bob = f"@bob:{origin.name}"
    # The sender is a member of the room, as a verified snapshot would say.
    join = origin.event(
        rid, "10", event_type="m.room.member", state_key=bob, content={"membership": "join"}
    )
    await room_state.seed_from_state(pg_pool, rid, "10", [join], our_user_id=OUR_USER)

    subject = f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"
    await ensure_verdicts_stream(nats_client.jetstream())
    service = EvaluationService(
        redis=redis_client,
        pool=pg_pool,
        pipeline=Pipeline(
            FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OUR_USER),
            timeout_seconds=5,
        ),
        configs=CommunityConfigCache(pg_pool, instance_defaults({})),
        writer=GroupCommitWriter(pg_pool),
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=10,
        wait_seconds=5,
    )
    await service.start(nats_client, subject=subject)
    consumer = make_consumer(pg_pool, nats_client, keyring, warden_identity, subject)
    try:
        event = origin.event(rid, "10", body="b" * 100, sender=bob)
        padded = copy.deepcopy(event)
        padded["unsigned"]["pad"] = "x" * 12_000
        assert len(orjson.dumps(padded)) > 12_000  # over length_filter_max_length

        assert await consumer.handle(delivery(padded, rid, origin.name)) == ACK

        event_id = str(compute_event_id(get_room_version("10"), event))
        verdict = await get_verdict(pg_pool, event_id)
        assert verdict is not None, "the event was not judged"
        assert not verdict.prohibited, verdict.filters  # was spam.flooding (length)
        assert not await redis_client.exists(redis_keys.hellban("default", bob))
    finally:
        await service.stop()

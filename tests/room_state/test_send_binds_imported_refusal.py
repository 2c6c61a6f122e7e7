"""``/send`` judging binds a room v1/v2 refusal imported from policyserv (stored unbound)
to the event delivered under its ID, through the real evaluation service."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import new_room_id
from tests.room_state.test_room_state_consumer import (
    OUR_USER,
    delivery,
    make_consumer,
    start_origin,
)
from tests.storage.test_unbound_verdicts import store_unbound
from warden.bus.consumer import ACK
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import EVALUATE_SUBJECT
from warden.federation.keyring import Keyring
from warden.filters.base import FilterDeps
from warden.matrix.event_hashes import compute_reference_hash
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


async def test_send_binds_an_imported_room_v1_refusal(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    nats_client: NATS,
    keyring: Keyring,
    warden_identity: Identity,
    https_server: Any,
) -> None:
    origin = await start_origin(https_server)
    room = await put_room(pg_pool, new_room_id("1"), "1", "default")
    rid = room.room_id
    bob = f"@bob:{origin.name}"
    join = origin.event(
        rid, "1", event_type="m.room.member", state_key=bob, content={"membership": "join"}
    )
    await room_state.seed_from_state(pg_pool, rid, "1", [join], our_user_id=OUR_USER)
    event = origin.event(rid, "1", body="an ordinary hello", sender=bob)
    await store_unbound(pg_pool, event["event_id"])

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
        assert await consumer.handle(delivery(event, rid, origin.name)) == ACK
    finally:
        await service.stop()

    verdict = await get_verdict(pg_pool, event["event_id"])
    assert verdict is not None and verdict.prohibited
    assert verdict.harms == ("org.matrix.msc4456.spam",)
    digest = compute_reference_hash(get_room_version("1"), event)
    assert verdict.reference_hash == encode_base64(digest)
    assert (verdict.room_id, verdict.community_id) == (rid, "default")

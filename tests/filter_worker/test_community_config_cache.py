"""The worker's community configuration cache: layering, tolerance, invalidation."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest
from nats.aio.client import Client as NATS

from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.policy.config import instance_defaults
from warden.storage.communities import create_community, update_community
from warden_filter_worker.community_config import (
    CommunityConfigCache,
    UnknownCommunity,
    layer_stored_config,
)


def test_stored_keys_that_no_longer_fit_are_skipped() -> None:
    stored = {
        "keyword_filter_keywords": ["x"],
        "many_ats_filter_max_ats": "many",  # wrong type
        "retired_filter_setting": True,  # unknown
        "density_filter_max_density": 1,  # an int is a fine number
    }
    assert layer_stored_config("c", stored) == {
        "keyword_filter_keywords": ["x"],
        "density_filter_max_density": 1.0,
    }


async def test_layering_and_invalidation(pg_pool: asyncpg.Pool, nats_client: NATS) -> None:
    cid = f"c-{uuid.uuid4().hex[:8]}"
    await create_community(pg_pool, "t", community_id=cid)
    await update_community(pg_pool, cid, config={"many_ats_filter_max_ats": 3})
    env = {"PS_MANY_ATS_FILTER_MAX_ATS": "7", "PS_LENGTH_FILTER_MAX_LENGTH": "99"}
    cache = CommunityConfigCache(pg_pool, instance_defaults(env))
    cfg = await cache.get(cid)
    assert cfg.get_int("many_ats_filter_max_ats") == 3  # community wins
    assert cfg.get_int("length_filter_max_length") == 99  # instance default
    assert cfg.get_int("mention_filter_max_mentions") == 20  # code default

    await update_community(pg_pool, cid, config={})
    assert (await cache.get(cid)).get_int("many_ats_filter_max_ats") == 3  # cached

    await cache.subscribe(nats_client)
    try:
        await nats_client.publish(CONFIG_CHANGED_SUBJECT, orjson.dumps({"community_id": cid}))
        await nats_client.flush()
        for _ in range(200):
            if (await cache.get(cid)).get_int("many_ats_filter_max_ats") == 7:
                break
            await asyncio.sleep(0.01)
        assert (await cache.get(cid)).get_int("many_ats_filter_max_ats") == 7

        # A message not naming a community drops everything.
        await update_community(pg_pool, cid, config={"many_ats_filter_max_ats": 1})
        await nats_client.publish(CONFIG_CHANGED_SUBJECT, b'{"room_id": "!r:x"}')
        await nats_client.flush()
        for _ in range(200):
            if (await cache.get(cid)).get_int("many_ats_filter_max_ats") == 1:
                break
            await asyncio.sleep(0.01)
        assert (await cache.get(cid)).get_int("many_ats_filter_max_ats") == 1
    finally:
        await cache.unsubscribe()

    with pytest.raises(UnknownCommunity):
        await cache.get("no-such-community")


async def test_entries_expire_even_without_a_notification(pg_pool: asyncpg.Pool) -> None:
    # A change whose NATS notification was lost (worker disconnected) still takes
    # effect once the entry is older than the bound.
    now = [1000.0]
    cache = CommunityConfigCache(
        pg_pool, instance_defaults(), max_age_seconds=60, clock=lambda: now[0]
    )
    community = await create_community(pg_pool, f"ttl {uuid.uuid4().hex[:6]}")
    assert (await cache.get(community.community_id)).get_int("many_ats_filter_max_ats") == 20
    await update_community(pg_pool, community.community_id, config={"many_ats_filter_max_ats": 3})
    now[0] += 59
    assert (await cache.get(community.community_id)).get_int("many_ats_filter_max_ats") == 20
    now[0] += 2
    assert (await cache.get(community.community_id)).get_int("many_ats_filter_max_ats") == 3

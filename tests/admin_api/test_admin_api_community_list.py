"""``GET /api/v1/communities``: every community, ordered by ID, never a token."""

from __future__ import annotations

import asyncpg
import httpx

from tests.admin_api.admin_api_helpers import assert_matrix_error
from warden.storage import communities


async def test_communities_are_listed_in_id_order(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    r = await admin.get("/api/v1/communities")
    assert r.status_code == 200, r.text
    assert r.json() == [
        {
            "community_id": "default",
            "name": "Default community",
            "config": {},
            "can_self_join_rooms": False,
        }
    ]
    await communities.create_community(admin_pool, "Zebras", community_id="zz")
    await communities.create_community(admin_pool, "Aardvarks", community_id="aa")
    await admin_pool.execute(
        "UPDATE communities SET api_access_token_hash = 'deadbeef' WHERE id = 'aa'"
    )
    await admin.patch("/api/v1/communities/aa", json={"config": {"spam_threshold": 0.5}})
    r = await admin.get("/api/v1/communities")
    assert r.status_code == 200, r.text
    listed = r.json()
    assert [c["community_id"] for c in listed] == ["aa", "default", "zz"]
    assert listed[0] == {
        "community_id": "aa",
        "name": "Aardvarks",
        "config": {"spam_threshold": 0.5},
        "can_self_join_rooms": False,
    }
    assert "deadbeef" not in r.text


async def test_listing_needs_the_key(anonymous: httpx.AsyncClient) -> None:
    assert_matrix_error(await anonymous.get("/api/v1/communities"), 401, "M_UNAUTHORIZED")

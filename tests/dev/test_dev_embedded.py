"""Embedded NATS, Redis and PostgreSQL: started when the URL does not answer, stopped clean."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis
from dev_helpers import (
    REAL_NATS,
    REAL_POSTGRES,
    REAL_REDIS,
    assert_gone,
    processes_mentioning,
)

from warden.dev import embedded
from warden.dev.procs import free_port, group_members, pid_alive


async def test_embedded_nats_with_jetstream(tmp_path: Path, closed_port: int) -> None:
    handle = await embedded.ensure_nats(f"nats://127.0.0.1:{closed_port}", tmp_path)
    assert handle.embedded
    assert handle.process is not None
    assert handle.url.startswith("nats://127.0.0.1:")
    assert str(closed_port) not in handle.url
    pid = handle.process.pid
    try:
        nc = await nats.connect(handle.url, allow_reconnect=False)
        js = nc.jetstream()
        await js.add_stream(name="DEVTEST", subjects=["devtest.>"])
        ack = await js.publish("devtest.one", b"hello")
        assert ack.stream == "DEVTEST"
        msg = await js.get_msg("DEVTEST", ack.seq)
        assert msg.data == b"hello"
        await nc.close()
        # JetStream keeps its store under the given directory.
        assert (tmp_path / "nats" / "jetstream").is_dir()
    finally:
        handle.stop()
    assert not pid_alive(pid)
    assert group_members(pid) == []


async def test_embedded_redis(tmp_path: Path, closed_port: int) -> None:
    handle = await embedded.ensure_redis(f"redis://127.0.0.1:{closed_port}/0", tmp_path)
    assert handle.embedded
    assert handle.process is not None
    pid = handle.process.pid
    try:
        client = aioredis.Redis.from_url(handle.url)
        await client.set("warden:dev", "value")
        assert await client.get("warden:dev") == b"value"
        await client.aclose()
    finally:
        handle.stop()
    assert not pid_alive(pid)


async def test_embedded_postgres(tmp_path: Path, closed_port: int) -> None:
    url = f"postgres://policyserv:devonly@127.0.0.1:{closed_port}/policyserv?sslmode=disable"
    handle = await embedded.ensure_postgres(url, tmp_path, explicit=False)
    assert handle.embedded
    assert handle.process is not None
    assert handle.url.endswith("/warden?sslmode=disable")
    pid = handle.process.pid
    try:
        conn = await asyncpg.connect(handle.url)
        assert await conn.fetchval("SELECT current_database()") == "warden"
        await conn.execute("CREATE TABLE t (id int primary key, name text)")
        await conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        assert await conn.fetch("SELECT name FROM t ORDER BY id") == [
            ("one",),
            ("two",),
        ]
        await conn.close()
        # The cluster is reachable as .../pg/data (maybe a link: see embedded._data_dir).
        assert (tmp_path / "pg" / "data" / "PG_VERSION").exists()
    finally:
        handle.stop()
    assert not pid_alive(pid)
    # The postmaster's helpers (checkpointer, walwriter, ...) are gone too: they share
    # its process group, and their command lines do not name the data directory.
    assert group_members(pid) == []

    # A second start reuses the cluster: the data survived the clean stop.
    again = await embedded.start_postgres(tmp_path)
    try:
        conn = await asyncpg.connect(again.url)
        assert await conn.fetchval("SELECT count(*) FROM t") == 2
        await conn.close()
    finally:
        again.stop()


async def test_explicit_database_that_fails_is_an_error(tmp_path: Path, closed_port: int) -> None:
    url = f"postgres://someone:secret@127.0.0.1:{closed_port}/db"
    with pytest.raises(embedded.EmbeddedError) as info:
        await embedded.ensure_postgres(url, tmp_path, explicit=True)
    message = str(info.value)
    assert "PS_DATABASE" in message
    assert "unset PS_DATABASE" in message
    assert "secret" not in message  # the password is not printed
    assert not (tmp_path / "pg").exists()


async def test_answering_servers_are_used_as_they_are(tmp_path: Path) -> None:
    servers = await embedded.ensure_servers(
        REAL_NATS, REAL_REDIS, REAL_POSTGRES, tmp_path, database_explicit=True
    )
    assert [h.kind for h in servers.handles] == ["nats", "redis", "postgres"]
    assert not any(h.embedded for h in servers.handles)
    assert servers.url("nats") == REAL_NATS
    assert servers.url("redis") == REAL_REDIS
    assert servers.url("postgres") == REAL_POSTGRES
    assert list(tmp_path.iterdir()) == []  # nothing was started or created
    servers.stop()  # a no-op for servers we did not start


async def test_nats_without_jetstream_is_not_enough(tmp_path: Path) -> None:
    port = free_port()
    plain = subprocess.Popen(
        [str(embedded.nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"nats://127.0.0.1:{port}"
        for _ in range(50):
            reason = await embedded.probe_nats(url)
            if reason is not None and "JetStream" in reason:
                break

            await asyncio.sleep(0.1)
        assert reason is not None
        assert "JetStream" in reason
        handle = await embedded.ensure_nats(url, tmp_path)
        try:
            assert handle.embedded
            assert handle.url != url
            assert await embedded.probe_nats(handle.url) is None
        finally:
            handle.stop()
    finally:
        plain.terminate()
        plain.wait(5)


def test_servers_die_with_a_killed_parent(tmp_path: Path) -> None:
    """Even a SIGKILLed `warden dev` does not leave embedded servers running."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from pathlib import Path
        from warden.dev import embedded

        async def main():
            base = Path({str(tmp_path)!r})
            hs = [await embedded.start_nats(base), await embedded.start_redis(base),
                  await embedded.start_postgres(base)]
            print(" ".join(str(h.process.pid) for h in hs), flush=True)

        asyncio.run(main())
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    line = parent.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 3
    assert all(pid_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait(5)
    assert_gone(pids, timeout=15)
    assert all(group_members(p) == [] for p in pids)  # PostgreSQL's backends too
    assert processes_mentioning(str(tmp_path)) == []

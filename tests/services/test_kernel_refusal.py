"""Penalised addresses dropped by the kernel: the socket filter on real listening sockets.

The program alone (IPv4 addresses and IPv6 /64s dropped, every other address kept),
then ``KernelRefusal`` following a ``ClientPenalties`` with a fixed clock: attached when
a penalty starts, detached when it ends, bounded in addresses.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from warden.runtime.client_penalties import ClientPenalties, client_bucket
from warden.runtime.kernel_refusal import (
    MAX_FILTERED,
    MIN_UPDATE_INTERVAL_SECONDS,
    KernelRefusal,
    attach,
    build_program,
)

# A connection attempt the kernel drops gets no answer at all: this long is enough to
# tell it from one that is accepted (loopback answers in microseconds).
DROPPED_AFTER = 1.0


@pytest.fixture
async def listener() -> AsyncIterator[asyncio.Server]:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    async with server:
        yield server


async def _connects(port: int, source: str, host: str = "127.0.0.1") -> bool:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=(source, 0)), DROPPED_AFTER
        )
    except TimeoutError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def _gauge() -> float:
    value = REGISTRY.get_sample_value("warden_http_kernel_dropped_clients")
    assert value is not None
    return value


async def _gauge_becomes(value: float) -> None:
    """Wait (boundedly) for the filter's update to run."""
    for _ in range(500):
        if _gauge() == value:
            return
        await asyncio.sleep(0.01)
    assert _gauge() == value


async def test_the_program_drops_listed_ipv4_addresses_only(listener: asyncio.Server) -> None:
    sock = listener.sockets[0]
    port = sock.getsockname()[1]
    attach(sock, build_program(["127.0.0.2", "127.0.0.4", "2001:db8::/64"]))
    assert not await _connects(port, "127.0.0.2")
    assert not await _connects(port, "127.0.0.4")
    assert await _connects(port, "127.0.0.1")
    assert await _connects(port, "127.0.0.3")
    attach(sock, None)
    assert await _connects(port, "127.0.0.2")
    attach(sock, None)  # detaching twice is fine


async def test_the_program_drops_listed_ipv6_prefixes_only() -> None:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "::1", 0)
    async with server:
        sock = server.sockets[0]
        port = sock.getsockname()[1]
        attach(sock, build_program(["2001:db8::/64", "127.0.0.1"]))
        assert await _connects(port, "::1", host="::1")
        attach(sock, build_program([client_bucket("::1")]))
        assert client_bucket("::1") == "::/64"
        assert not await _connects(port, "::1", host="::1")


def test_the_program_stays_within_the_kernel_limit() -> None:
    v6 = [f"2001:db8:{i:x}::/64" for i in range(MAX_FILTERED)]
    assert len(build_program(v6)) < 4096
    assert len(build_program(v6 + [f"10.0.{i // 256}.{i % 256}" for i in range(100)])) < 4096


async def test_the_filter_follows_the_penalties(listener: asyncio.Server) -> None:
    now = [1000.0]
    penalties = ClientPenalties(3, 30.0, clock=lambda: now[0])
    sock = listener.sockets[0]
    port = sock.getsockname()[1]
    refusal = KernelRefusal(penalties, [sock])
    try:
        for _ in range(3):
            penalties.failed("127.0.0.2")
        await _gauge_becomes(1)  # the update runs on a later turn of the loop
        assert not await _connects(port, "127.0.0.2")
        assert await _connects(port, "127.0.0.3")
        # The penalty ends: the filter goes with it.
        now[0] += 31
        refusal.update()
        assert _gauge() == 0
        assert await _connects(port, "127.0.0.2")
    finally:
        refusal.close()
    for _ in range(3):
        penalties.failed("127.0.0.5")  # no longer followed
    await asyncio.sleep(2 * MIN_UPDATE_INTERVAL_SECONDS)  # longer than any update takes
    assert _gauge() == 0
    assert await _connects(port, "127.0.0.5")


async def test_at_most_max_filtered_addresses_are_in_the_program(
    listener: asyncio.Server,
) -> None:
    now = [1000.0]
    penalties = ClientPenalties(1, 30.0, clock=lambda: now[0])
    sock = listener.sockets[0]
    port = sock.getsockname()[1]
    refusal = KernelRefusal(penalties, [sock])
    try:
        # The first ones penalised end first: the program keeps the last MAX_FILTERED.
        for i in range(MAX_FILTERED + 88):
            penalties.failed(f"10.1.{i // 256}.{i % 256}")
            now[0] += 0.001
        for _ in range(2):
            penalties.failed("127.0.0.2")
            now[0] += 0.001
        await _gauge_becomes(MAX_FILTERED)
        assert not await _connects(port, "127.0.0.2")
        assert len(penalties.penalties()) == MAX_FILTERED + 89
    finally:
        refusal.close()
    assert _gauge() == 0
    assert await _connects(port, "127.0.0.2")


async def test_a_penalty_earned_before_the_filter_started_is_filtered(
    listener: asyncio.Server,
) -> None:
    # The gateway starts following the penalties once all its listeners are up; the
    # federation listener may have penalised someone by then.
    penalties = ClientPenalties(1, 30.0)
    penalties.failed("127.0.0.2")
    sock = listener.sockets[0]
    refusal = KernelRefusal(penalties, [sock])
    try:
        await _gauge_becomes(1)
        assert not await _connects(sock.getsockname()[1], "127.0.0.2")
    finally:
        refusal.close()


async def test_programs_are_rebuilt_at_most_every_interval(listener: asyncio.Server) -> None:
    # An attacker earning penalties with many addresses gets one rebuild per interval,
    # not one per penalty.
    penalties = ClientPenalties(1, 30.0)
    refusal = KernelRefusal(penalties, [listener.sockets[0]])
    try:
        penalties.failed("127.0.0.2")
        await _gauge_becomes(1)
        built_at = refusal._last_update
        for i in range(20):
            penalties.failed(f"10.2.0.{i}")
        scheduled = refusal._scheduled
        assert scheduled is not None
        assert isinstance(scheduled, asyncio.TimerHandle)
        assert scheduled.when() >= built_at + MIN_UPDATE_INTERVAL_SECONDS
        await _gauge_becomes(21)  # all twenty in the next program
    finally:
        refusal.close()


async def test_a_listener_that_cannot_take_the_program_leaves_none_behind(
    listener: asyncio.Server,
) -> None:
    # Two listeners, the second one unusable: the first must not keep a program nobody
    # updates any more (the HTTP front still refuses penalised connections).
    penalties = ClientPenalties(1, 30.0)
    sock = listener.sockets[0]
    broken = socket.socket()
    broken.close()
    refusal = KernelRefusal(penalties, [sock, broken])
    try:
        penalties.failed("127.0.0.2")
        await asyncio.sleep(2 * MIN_UPDATE_INTERVAL_SECONDS)
        assert _gauge() == 0
        assert await _connects(sock.getsockname()[1], "127.0.0.2")
        penalties.failed("127.0.0.4")  # not tried again
        await asyncio.sleep(2 * MIN_UPDATE_INTERVAL_SECONDS)
        assert await _connects(sock.getsockname()[1], "127.0.0.4")
    finally:
        refusal.close()

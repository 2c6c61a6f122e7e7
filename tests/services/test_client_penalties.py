"""Addresses that keep failing authentication are refused as their connections open.

``ClientPenalties`` alone with a fixed clock, then the HTTP front on a real uvicorn
server and real sockets: a client from ``127.0.0.2`` that failed past the limit has its
open connection closed after its answer and its new connections answered 429 and closed
before it sends anything; a trusted proxy's connection (``127.0.0.1``, uvicorn's default
``FORWARDED_ALLOW_IPS``) is never refused; the penalty ends.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send

from tests.local_servers import serve_behind_front
from tests.service_processes import free_port
from warden.runtime.client_penalties import WINDOW_SECONDS, ClientPenalties, client_bucket
from warden.runtime.http_limits import HttpLimits, trusted_proxy_networks
from warden.settings import Settings

ATTACKER = "127.0.0.2"


def test_failures_past_the_limit_within_the_window_earn_the_penalty() -> None:
    now = [100.0]
    penalties = ClientPenalties(3, 60.0, clock=lambda: now[0])
    assert not penalties.active
    penalties.failed(ATTACKER)
    penalties.failed(ATTACKER)
    now[0] += WINDOW_SECONDS  # a new window: the count starts again
    penalties.failed(ATTACKER)
    penalties.failed(ATTACKER)
    assert penalties.penalised(ATTACKER) == 0.0
    penalties.failed(ATTACKER)
    assert penalties.active and penalties.penalised(ATTACKER) == 60.0
    assert penalties.penalised("127.0.0.3") == 0.0
    now[0] += 59.5
    assert penalties.penalised(ATTACKER) == pytest.approx(0.5)
    now[0] += 1.0
    assert penalties.penalised(ATTACKER) == 0.0 and not penalties.active
    penalties.failed(None)  # unknown address: not counted


def test_ipv6_addresses_count_per_64_and_zero_turns_penalties_off() -> None:
    penalties = ClientPenalties(2, 60.0, clock=lambda: 0.0)
    penalties.failed("2001:db8::1")
    penalties.failed("2001:db8::ffff:2")
    assert penalties.penalised("2001:db8::3")
    assert not penalties.penalised("2001:db8:0:1::1")
    off = ClientPenalties(0, 60.0)
    for _ in range(1000):
        off.failed(ATTACKER)
    assert not off.active and not off.penalised(ATTACKER)


def test_penalties_nobody_asks_about_again_do_not_pile_up() -> None:
    now = [0.0]
    penalties = ClientPenalties(1, 5.0, clock=lambda: now[0])
    for n in range(1, 200):
        penalties.failed(f"192.0.2.{n}")
        now[0] += 1.0  # each penalty over before long, never asked about
    assert len(penalties._penalised) <= 6  # those still running, and the newest


def test_ipv4_clients_of_a_dual_stack_listener_count_as_themselves() -> None:
    # Not as the /64 of ::ffff:0:0/96 that every IPv4 client would share.
    assert client_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_bucket("::ffff:192.0.2.8") != client_bucket("::ffff:192.0.2.7")


def test_the_table_is_bounded() -> None:
    now = [0.0]
    penalties = ClientPenalties(2, 60.0, max_clients=2, clock=lambda: now[0])
    penalties.failed("192.0.2.1")
    penalties.failed("192.0.2.2")
    penalties.failed("192.0.2.3")  # full, and the oldest still counting: not counted
    penalties.failed("192.0.2.3")
    assert not penalties.penalised("192.0.2.3")
    now[0] += WINDOW_SECONDS  # the oldest window is over: it makes room
    penalties.failed("192.0.2.3")
    penalties.failed("192.0.2.3")
    assert penalties.penalised("192.0.2.3")


def test_settings_and_trusted_proxies() -> None:
    settings = Settings(http_auth_failure_limit=7, http_auth_failure_penalty_seconds=5)
    penalties = ClientPenalties.from_settings(settings)
    for _ in range(7):
        penalties.failed(ATTACKER)
    assert 0 < penalties.penalised(ATTACKER) <= 5
    assert trusted_proxy_networks("*") == (True, ())
    everyone, networks = trusted_proxy_networks("127.0.0.1, 10.0.0.0/8,unix:/x")
    assert not everyone and [str(n) for n in networks] == ["127.0.0.1/32", "10.0.0.0/8"]


# --- the HTTP front ---


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def front() -> AsyncIterator[tuple[int, ClientPenalties, _Clock]]:
    """A server whose ``/fail`` answers 401 and counts a failure for its client."""
    clock = _Clock()
    penalties = ClientPenalties(3, 30.0, clock=clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        status = 200
        if scope["path"] == "/fail":
            status = 401
            penalties.failed_request(scope)  # direct connections only
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    port = free_port()
    async with serve_behind_front(app, HttpLimits(penalties=penalties), port):
        yield port, penalties, clock


async def _open(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    await asyncio.wait_for(reader.readexactly(2), 10)
    return head


def _refused() -> float:
    return REGISTRY.get_sample_value("warden_http_rejected_total", {"reason": "penalised"}) or 0.0


async def test_a_penalised_address_is_cut_off_and_comes_back_after_the_penalty(
    front: tuple[int, ClientPenalties, _Clock],
) -> None:
    port, penalties, clock = front
    before = _refused()
    reader, writer = await _open(port, ATTACKER)
    assert (await _ask(reader, writer, "/ok")).startswith(b"HTTP/1.1 200 ")
    assert (await _ask(reader, writer, "/fail")).startswith(b"HTTP/1.1 401 ")
    assert (await _ask(reader, writer, "/fail")).startswith(b"HTTP/1.1 401 ")
    # The third failure earns the penalty: its answer is the connection's last.
    assert (await _ask(reader, writer, "/fail")).startswith(b"HTTP/1.1 401 ")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()

    # A new connection is answered before it sends anything, and closed.
    reader, writer = await _open(port, ATTACKER)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 429 "), answer
    assert b'"errcode":"M_LIMIT_EXCEEDED"' in answer
    retry = re.search(rb"\r\nretry-after: (\d+)\r\n", answer, re.I)
    assert retry is not None and 1 <= int(retry.group(1)) <= 30
    assert _refused() == before + 2

    # A trusted proxy's requests are not counted ...
    reader, writer = await _open(port, "127.0.0.1")
    for _ in range(5):
        assert (await _ask(reader, writer, "/fail")).startswith(b"HTTP/1.1 401 ")
    writer.close()
    assert not penalties.penalised("127.0.0.1")
    # ... and its connection is never refused, even under a penalty of its own.
    for _ in range(3):
        penalties.failed("127.0.0.1")
    assert penalties.penalised("127.0.0.1")
    reader, writer = await _open(port, "127.0.0.1")
    assert (await _ask(reader, writer, "/ok")).startswith(b"HTTP/1.1 200 ")
    assert (await _ask(reader, writer, "/ok")).startswith(b"HTTP/1.1 200 ")
    writer.close()

    clock.now += 31  # the penalty is over
    reader, writer = await _open(port, ATTACKER)
    assert (await _ask(reader, writer, "/ok")).startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert _refused() == before + 2

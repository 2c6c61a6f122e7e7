"""Server name resolution through a real (local) DNS server: SRV, A/AAAA, fallbacks.

No ``.well-known`` is served in these tests: the hostnames have no address or nothing
listens on the well-known port, which the spec treats like a missing ``.well-known``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.federation.conftest import LocalDNSServer
from warden.federation.errors import ResolutionError, TemporaryFederationError
from warden.federation.network_guard import NetworkGuard
from warden.federation.resolver import (
    MAX_SRV_TARGETS,
    SRV_LOOKUP_CONCURRENCY,
    ResolvedServer,
    ServerNameResolver,
)

ALLOW_ALL = NetworkGuard(["0.0.0.0/0", "::/0"], [])


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def make_resolver(dns_server) -> AsyncIterator[Callable[..., ServerNameResolver]]:
    made: list[ServerNameResolver] = []

    def factory(**kwargs: Any) -> ServerNameResolver:
        kwargs.setdefault("well_known_port", _unused_port())
        resolver = ServerNameResolver(ALLOW_ALL, dns_resolver=dns_server.resolver(), **kwargs)
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.aclose()


async def test_matrix_fed_srv_is_preferred_over_legacy_srv(dns_server, make_resolver) -> None:
    dns_server.add("_matrix-fed._tcp.a.test", "SRV", "10 0 8443 fed.a.test.")
    dns_server.add("_matrix._tcp.a.test", "SRV", "10 0 9443 legacy.a.test.")
    dns_server.add("fed.a.test", "A", "127.0.0.11")
    dns_server.add("legacy.a.test", "A", "127.0.0.12")

    resolved = await make_resolver().resolve("a.test")

    # Host header and certificate name stay the server name, not the SRV target.
    assert resolved == ResolvedServer("a.test", "a.test", "a.test", [("127.0.0.11", 8443)])
    assert ("_matrix._tcp.a.test", "SRV") not in dns_server.queries


async def test_legacy_srv_is_used_when_there_is_no_matrix_fed(dns_server, make_resolver) -> None:
    dns_server.add("_matrix._tcp.a.test", "SRV", "10 0 9443 legacy.a.test.")
    dns_server.add("legacy.a.test", "A", "127.0.0.12")
    dns_server.add("legacy.a.test", "AAAA", "::1")

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [("127.0.0.12", 9443), ("::1", 9443)]
    assert (resolved.host_header, resolved.tls_server_name) == ("a.test", "a.test")
    assert ("_matrix-fed._tcp.a.test", "SRV") in dns_server.queries


async def test_srv_records_are_ordered_by_priority(dns_server, make_resolver) -> None:
    dns_server.add(
        "_matrix-fed._tcp.a.test",
        "SRV",
        "30 0 3000 third.a.test.",
        "10 0 1000 first.a.test.",
        "20 0 2000 second.a.test.",
    )
    dns_server.add("first.a.test", "A", "127.0.0.1")
    dns_server.add("second.a.test", "AAAA", "::1")
    dns_server.add("third.a.test", "A", "127.0.0.3")

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [("127.0.0.1", 1000), ("::1", 2000), ("127.0.0.3", 3000)]


async def test_srv_target_that_does_not_resolve_is_skipped(dns_server, make_resolver) -> None:
    dns_server.add(
        "_matrix-fed._tcp.a.test", "SRV", "10 0 1000 gone.a.test.", "20 0 2000 ok.a.test."
    )
    dns_server.add("ok.a.test", "A", "127.0.0.2")

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [("127.0.0.2", 2000)]


async def test_srv_target_cname_is_followed(dns_server, make_resolver) -> None:
    dns_server.add("_matrix-fed._tcp.a.test", "SRV", "10 0 1000 alias.a.test.")
    dns_server.add("alias.a.test", "CNAME", "real.b.test.")
    dns_server.add("real.b.test", "A", "127.0.0.7")

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [("127.0.0.7", 1000)]


async def test_no_srv_falls_back_to_address_records_on_8448(dns_server, make_resolver) -> None:
    dns_server.add("a.test", "A", "127.0.0.5")
    dns_server.add("a.test", "AAAA", "::1")

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer(
        "a.test", "a.test", "a.test", [("127.0.0.5", 8448), ("::1", 8448)]
    )
    queried = {q for q in dns_server.queries if q[1] == "SRV"}
    assert queried == {("_matrix-fed._tcp.a.test", "SRV"), ("_matrix._tcp.a.test", "SRV")}


async def test_srv_dot_target_means_no_service(dns_server, make_resolver) -> None:
    dns_server.add("_matrix-fed._tcp.a.test", "SRV", "0 0 0 .")
    dns_server.add("a.test", "A", "127.0.0.5")

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [("127.0.0.5", 8448)]


async def test_explicit_port_skips_well_known_and_srv(dns_server, make_resolver) -> None:
    dns_server.add("a.test", "A", "127.0.0.5")
    dns_server.add("_matrix-fed._tcp.a.test", "SRV", "10 0 1000 other.a.test.")

    resolved = await make_resolver().resolve("a.test:8000")

    assert resolved == ResolvedServer("a.test:8000", "a.test:8000", "a.test", [("127.0.0.5", 8000)])
    assert all(rdtype != "SRV" for _, rdtype in dns_server.queries)


async def test_localhost_is_loopback_without_asking_dns(dns_server, make_resolver) -> None:
    resolved = await make_resolver().resolve("localhost:8008")

    assert resolved.targets == [("127.0.0.1", 8008), ("::1", 8008)]
    assert dns_server.queries == []


async def test_unknown_host_is_a_temporary_resolution_error(dns_server, make_resolver) -> None:
    with pytest.raises(ResolutionError, match=r"cannot resolve nowhere\.test") as info:
        await make_resolver().resolve("nowhere.test")
    assert isinstance(info.value, TemporaryFederationError)
    assert info.value.destination == "nowhere.test"


async def test_srv_lookup_failure_is_not_guessed_around(dns_server, make_resolver) -> None:
    dns_server.add("a.test", "A", "127.0.0.5")
    dns_server.fail("_matrix-fed._tcp.a.test")

    with pytest.raises(ResolutionError, match="SRV lookup"):
        await make_resolver().resolve("a.test")


async def test_default_port_is_a_parameter_for_tests_only(dns_server, make_resolver) -> None:
    dns_server.add("a.test", "A", "127.0.0.5")

    resolved = await make_resolver(default_port=18448).resolve("a.test")

    assert resolved.targets == [("127.0.0.5", 18448)]


class SlowDNSServer(LocalDNSServer):
    """``LocalDNSServer`` answering each query after a pause, counting queries in flight."""

    delay: float = 0.05
    in_flight: int = 0
    max_in_flight: int = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def answer() -> None:
            self.in_flight -= 1
            LocalDNSServer.datagram_received(self, data, addr)

        asyncio.get_running_loop().call_later(self.delay, answer)


async def test_srv_targets_are_capped_and_resolved_a_few_at_a_time() -> None:
    """Review L9: a 40-target SRV answer costs 10 targets' lookups, 3 targets at a time."""
    loop = asyncio.get_running_loop()
    transport, dns = await loop.create_datagram_endpoint(SlowDNSServer, local_addr=("127.0.0.1", 0))
    dns.port = transport.get_extra_info("sockname")[1]
    try:
        dns.add(
            "_matrix-fed._tcp.many.test",
            "SRV",
            *(f"{i} 0 {9000 + i} t{i}.many.test." for i in range(40)),
        )
        for i in range(40):
            dns.add(f"t{i}.many.test", "A", f"127.0.1.{i + 1}")
        capped = REGISTRY.get_sample_value("warden_srv_targets_capped_total") or 0.0
        resolver = ServerNameResolver(
            ALLOW_ALL, dns_resolver=dns.resolver(), well_known_port=_unused_port()
        )
        try:
            resolved = await resolver.resolve("many.test")
        finally:
            await resolver.aclose()
    finally:
        transport.close()

    # The first ten in priority order, each with its own port.
    assert resolved.targets == [(f"127.0.1.{i + 1}", 9000 + i) for i in range(MAX_SRV_TARGETS)]
    looked_up = {name for name, rdtype in dns.queries if name.startswith("t")}
    assert looked_up == {f"t{i}.many.test" for i in range(MAX_SRV_TARGETS)}
    assert dns.max_in_flight <= 2 * SRV_LOOKUP_CONCURRENCY  # A and AAAA per target
    assert REGISTRY.get_sample_value("warden_srv_targets_capped_total") == capped + 1

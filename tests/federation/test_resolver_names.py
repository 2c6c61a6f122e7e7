"""Server name parsing and the resolution steps that need no DNS (IP literals)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import httpx
import pytest

from warden.federation.network_guard import NetworkGuard
from warden.federation.resolver import (
    ResolvedServer,
    ServerNameResolver,
    _cache_seconds,
    parse_server_name,
)


@pytest.mark.parametrize(
    ("name", "host", "port", "is_ip"),
    [
        ("example.org", "example.org", None, False),
        ("example.org:8448", "example.org", 8448, False),
        ("matrix-1.example.org:1", "matrix-1.example.org", 1, False),
        ("localhost", "localhost", None, False),
        ("1.2.3.4", "1.2.3.4", None, True),
        ("1.2.3.4:65535", "1.2.3.4", 65535, True),
        ("[::1]", "::1", None, True),
        ("[2001:db8::1]:8448", "2001:db8::1", 8448, True),
        ("[::ffff:1.2.3.4]:443", "::ffff:1.2.3.4", 443, True),
        ("EXAMPLE.org", "EXAMPLE.org", None, False),
    ],
)
def test_valid_server_names(name: str, host: str, port: int | None, is_ip: bool) -> None:
    parts = parse_server_name(name)
    assert (parts.host, parts.port, parts.is_ip_literal) == (host, port, is_ip)
    if is_ip:
        assert parts.ip == ipaddress.ip_address(host)


@pytest.mark.parametrize(
    "name",
    [
        "",
        ":8448",
        "example.org:",
        "example.org:0",
        "example.org:65536",
        "example.org:84a8",
        "example.org:+80",
        "exa mple.org",
        "example_org",
        "example.org.",
        ".example.org",
        "ex..ample.org",
        "-example.org",
        "example-.org",
        "a" * 64 + ".org",
        "example.org/path",
        "user@example.org",
        "999.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "::1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[fe80::1%eth0]",
        "[1.2.3.4]",
        "[]",
        "[::g]",
        "example.org:8448:1",
        "ünicode.org",
    ],
)
def test_invalid_server_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid server name"):
        parse_server_name(name)


@pytest.fixture
async def ip_resolver() -> AsyncIterator[ServerNameResolver]:
    # DNS must not be consulted for IP literals: a resolver with no nameserver proves it.
    import dns.asyncresolver

    no_dns = dns.asyncresolver.Resolver(configure=False)
    no_dns.nameservers = []
    resolver = ServerNameResolver(NetworkGuard(["0.0.0.0/0", "::/0"], []), dns_resolver=no_dns)
    yield resolver
    await resolver.aclose()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1.2.3.4", ResolvedServer("1.2.3.4", "1.2.3.4", "1.2.3.4", [("1.2.3.4", 8448)])),
        (
            "1.2.3.4:8000",
            ResolvedServer("1.2.3.4:8000", "1.2.3.4:8000", "1.2.3.4", [("1.2.3.4", 8000)]),
        ),
        ("[::1]", ResolvedServer("[::1]", "[::1]", "::1", [("::1", 8448)])),
        (
            "[2001:db8::5]:443",
            ResolvedServer(
                "[2001:db8::5]:443", "[2001:db8::5]:443", "2001:db8::5", [("2001:db8::5", 443)]
            ),
        ),
    ],
)
async def test_ip_literals_resolve_without_dns_or_well_known(
    ip_resolver: ServerNameResolver, name: str, expected: ResolvedServer
) -> None:
    assert await ip_resolver.resolve(name) == expected


async def test_resolve_rejects_invalid_names(ip_resolver: ServerNameResolver) -> None:
    with pytest.raises(ValueError, match="invalid server name"):
        await ip_resolver.resolve("not a server name")


def test_resolver_defaults_follow_the_spec(ip_resolver: ServerNameResolver) -> None:
    assert ip_resolver.default_port == 8448
    assert ip_resolver.well_known_port == 443


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"cache-control": "max-age=600"}, 600.0),
        ({"cache-control": 'public, max-age="7200"'}, 7200.0),
        ({"cache-control": "no-store"}, 0.0),
        ({"cache-control": "no-cache, max-age=600"}, 0.0),
        ({"expires": "Thu, 01 Jan 1970 00:16:40 GMT"}, 1000.0 - 100.0),
        ({"expires": "garbage"}, 0.0),
        ({"cache-control": "max-age=60", "expires": "Thu, 01 Jan 1970 00:16:40 GMT"}, 60.0),
    ],
)
def test_cache_period_from_headers(headers: dict[str, str], expected: float | None) -> None:
    assert _cache_seconds(httpx.Headers(headers), now_wall=100.0) == expected

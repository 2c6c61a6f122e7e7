"""``.well-known/matrix/server`` delegation, served over real TLS by a local server.

The hostname ``a.test`` is mapped by the local DNS server to a random loopback address
where an HTTPS server with a ``tls_ca`` certificate for ``a.test`` answers on the
resolver's well-known port.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import trustme

from warden.federation.network_guard import NetworkGuard
from warden.federation.resolver import (
    WELL_KNOWN_DEFAULT_CACHE_SECONDS,
    WELL_KNOWN_MAX_CACHE_SECONDS,
    ResolvedServer,
    ServerNameResolver,
)

ALLOW_ALL = NetworkGuard(["0.0.0.0/0", "::/0"], [])


@dataclass
class WellKnownApp:
    """A raw ASGI app serving one canned response and recording requests."""

    body: bytes = b'{"m.server": "b.test:1234"}'
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # Responses for paths other than the well-known one: (status, headers, body).
    other: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Host)
    port: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        host = dict(scope["headers"]).get(b"host", b"").decode()
        self.requests.append((scope["path"], host))
        status, extra, body = self.other.get(scope["path"], (self.status, self.headers, self.body))
        headers = [(b"content-type", b"application/json")]
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def well_known(dns_server, https_server, loopback_ip) -> WellKnownApp:
    """Serve ``.well-known`` for a.test (at loopback_ip) and map a.test to it in DNS."""
    app = WellKnownApp()
    server = await https_server(app, host=loopback_ip, names=["a.test"])
    app.port = server.port
    dns_server.add("a.test", "A", loopback_ip)
    dns_server.add("b.test", "A", "127.0.0.9")
    return app


@pytest.fixture
async def make_resolver(
    dns_server, well_known: WellKnownApp, tls_ca: trustme.CA
) -> AsyncIterator[Callable[..., ServerNameResolver]]:
    made: list[ServerNameResolver] = []
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)

    def factory(**kwargs: Any) -> ServerNameResolver:
        kwargs.setdefault("guard", ALLOW_ALL)
        kwargs.setdefault("ssl_context", context)
        guard = kwargs.pop("guard")
        resolver = ServerNameResolver(
            guard,
            dns_resolver=dns_server.resolver(),
            well_known_port=well_known.port,
            **kwargs,
        )
        made.append(resolver)
        return resolver

    yield factory
    for resolver in made:
        await resolver.aclose()


async def test_delegation_with_port(well_known: WellKnownApp, make_resolver) -> None:
    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "b.test:1234", "b.test", [("127.0.0.9", 1234)])
    # The request went to a.test's address with a.test in Host (and, by the
    # certificate, in SNI).
    assert well_known.requests == [("/.well-known/matrix/server", f"a.test:{well_known.port}")]


async def test_delegation_to_ip_literal(well_known: WellKnownApp, make_resolver) -> None:
    well_known.body = b'{"m.server": "[::1]:4321"}'

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "[::1]:4321", "::1", [("::1", 4321)])


async def test_delegation_to_ip_literal_without_port(well_known, make_resolver) -> None:
    well_known.body = b'{"m.server": "127.0.0.9"}'

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "127.0.0.9", "127.0.0.9", [("127.0.0.9", 8448)])


async def test_delegated_name_without_port_uses_its_srv(
    well_known: WellKnownApp, dns_server, make_resolver
) -> None:
    well_known.body = b'{"m.server": "b.test"}'
    dns_server.add("_matrix-fed._tcp.b.test", "SRV", "1 1 5555 target.c.test.")
    dns_server.add("target.c.test", "AAAA", "::1")
    # a.test's own SRV must not be consulted once it delegates.
    dns_server.add("_matrix-fed._tcp.a.test", "SRV", "1 1 6666 target.c.test.")

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "b.test", "b.test", [("::1", 5555)])
    assert ("_matrix-fed._tcp.a.test", "SRV") not in dns_server.queries


async def test_delegated_name_legacy_srv(well_known, dns_server, make_resolver) -> None:
    well_known.body = b'{"m.server": "b.test"}'
    dns_server.add("_matrix._tcp.b.test", "SRV", "1 1 7777 target.c.test.")
    dns_server.add("target.c.test", "A", "127.0.0.3")

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "b.test", "b.test", [("127.0.0.3", 7777)])


async def test_delegated_name_without_srv_uses_8448(well_known, make_resolver) -> None:
    well_known.body = b'{"m.server": "b.test"}'

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "b.test", "b.test", [("127.0.0.9", 8448)])


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, b'{"errcode": "M_NOT_FOUND"}'),
        (500, b'{"m.server": "b.test:1234"}'),
        (200, b"not json"),
        (200, b'["m.server"]'),
        (200, b"{}"),
        (200, b'{"m.server": 1234}'),
        (200, b'{"m.server": "not a server name"}'),
        (200, b'{"m.server": "b.test:99999"}'),
        (200, b'{"m.server": "' + b"x" * 70_000 + b'"}'),
    ],
)
async def test_invalid_well_known_falls_back_to_srv(
    well_known: WellKnownApp, dns_server, make_resolver, status: int, body: bytes
) -> None:
    well_known.status, well_known.body = status, body
    dns_server.add("_matrix-fed._tcp.a.test", "SRV", "1 1 5555 target.c.test.")
    dns_server.add("target.c.test", "A", "127.0.0.3")

    resolved = await make_resolver().resolve("a.test")

    assert resolved == ResolvedServer("a.test", "a.test", "a.test", [("127.0.0.3", 5555)])
    assert len(well_known.requests) == 1


async def test_untrusted_well_known_certificate_is_ignored(
    well_known: WellKnownApp, make_resolver, loopback_ip
) -> None:
    # A resolver that does not trust tls_ca: the delegation must not be believed.
    resolver = make_resolver(ssl_context=ssl.create_default_context())

    resolved = await resolver.resolve("a.test")

    assert resolved == ResolvedServer("a.test", "a.test", "a.test", [(loopback_ip, 8448)])
    assert well_known.requests == []  # the handshake failed before any request


async def test_certificate_must_name_the_host(dns_server, make_resolver, loopback_ip) -> None:
    # c.test maps to the same server, whose certificate only names a.test.
    dns_server.add("c.test", "A", loopback_ip)

    resolved = await make_resolver().resolve("c.test")

    assert resolved.host_header == "c.test"
    assert resolved.targets == [(loopback_ip, 8448)]


async def test_result_is_cached_for_24h_by_default(well_known, make_resolver) -> None:
    clock = Clock()
    resolver = make_resolver(clock=clock)

    await resolver.resolve("a.test")
    clock.now += WELL_KNOWN_DEFAULT_CACHE_SECONDS - 1
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 1

    clock.now += 2
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 2


async def test_cache_control_max_age_is_honoured(well_known, make_resolver) -> None:
    well_known.headers = {"cache-control": "max-age=3600"}
    clock = Clock()
    resolver = make_resolver(clock=clock)

    await resolver.resolve("a.test")
    clock.now += 3599
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 1
    clock.now += 2
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 2


async def test_cache_period_is_capped_at_48h(well_known, make_resolver) -> None:
    well_known.headers = {"cache-control": "max-age=31536000"}
    clock = Clock()
    resolver = make_resolver(clock=clock)

    await resolver.resolve("a.test")
    clock.now += WELL_KNOWN_MAX_CACHE_SECONDS + 1
    await resolver.resolve("a.test")

    assert len(well_known.requests) == 2


async def test_failures_are_cached_with_backoff(well_known, make_resolver) -> None:
    well_known.status = 500
    clock = Clock()
    resolver = make_resolver(clock=clock)

    await resolver.resolve("a.test")
    clock.now += 299
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 1
    clock.now += 2  # past 5 minutes: second attempt
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 2
    clock.now += 301  # second failure backs off to 10 minutes
    await resolver.resolve("a.test")
    assert len(well_known.requests) == 2
    clock.now += 300
    well_known.status = 200
    resolved = await resolver.resolve("a.test")
    assert len(well_known.requests) == 3
    assert resolved.host_header == "b.test:1234"


async def test_redirect_is_followed(well_known: WellKnownApp, make_resolver) -> None:
    well_known.status = 302
    well_known.headers = {"location": f"https://a.test:{well_known.port}/elsewhere"}
    well_known.other["/elsewhere"] = (200, {}, b'{"m.server": "b.test:1234"}')
    well_known.body = b""

    resolved = await make_resolver().resolve("a.test")

    paths = [path for path, _ in well_known.requests]
    assert paths == ["/.well-known/matrix/server", "/elsewhere"]
    assert resolved.host_header == "b.test:1234"


async def test_redirect_loop_gives_up(well_known: WellKnownApp, make_resolver, loopback_ip) -> None:
    well_known.status = 301
    well_known.headers = {"location": "/.well-known/matrix/server"}

    resolved = await make_resolver(max_redirects=3).resolve("a.test")

    assert len(well_known.requests) == 4
    assert resolved.targets == [(loopback_ip, 8448)]


async def test_redirect_to_plain_http_is_refused(well_known, make_resolver, loopback_ip) -> None:
    well_known.status = 302
    well_known.headers = {"location": f"http://a.test:{well_known.port}/x"}

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [(loopback_ip, 8448)]
    assert len(well_known.requests) == 1


async def test_well_known_fetch_goes_through_the_guard(
    well_known: WellKnownApp, make_resolver, loopback_ip
) -> None:
    guard = NetworkGuard(["0.0.0.0/0", "::/0"], [f"{loopback_ip}/32"])

    resolved = await make_resolver(guard=guard).resolve("a.test")

    assert well_known.requests == []
    # Resolution still answers (the spec's fallback); connecting is refused later.
    assert resolved.targets == [(loopback_ip, 8448)]


async def test_well_known_body_is_decoded_as_json_object(well_known, make_resolver) -> None:
    well_known.body = orjson.dumps({"m.server": "b.test:1234", "extra": [1, 2]})

    resolved = await make_resolver().resolve("a.test")

    assert resolved.targets == [("127.0.0.9", 1234)]

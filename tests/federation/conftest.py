"""Shared fixtures for the federation tests: real local servers on loopback only.

Resolver, network guard and client fixtures (``tls_ca``, ``dns_server``,
``https_server``, ``tcp_listener``, ``loopback_ip``) come first; other areas add
their own fixtures below, prefixed with their area.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trustme

from tests.local_servers import ThreadedServer, start_threaded, stop_all

# --------------------------------------------------------------------------------------
# Resolver / network guard / client fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority the tests' HTTPS servers are signed by."""
    return trustme.CA()


@pytest.fixture
def tls_ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    """``tls_ca``'s certificate as a PEM file (for ``PS_FEDERATION_CA_FILE``)."""
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


# Tests deny 127.66.0.0/16 as "a private network"; random loopback addresses stay out.
DENIED_TEST_NETWORK = "127.66.0.0/16"
_DENIED_TEST_OCTET = 66


def random_loopback_ip() -> str:
    """A random 127.x.y.z address outside ``DENIED_TEST_NETWORK``.

    An address inside it once made a test's honest server a denied one (1 run in 253).
    """
    rng = random.SystemRandom()
    second = rng.choice([n for n in range(2, 255) if n != _DENIED_TEST_OCTET])
    return f"127.{second}.{rng.randint(1, 254)}.{rng.randint(1, 254)}"


@pytest.fixture
def loopback_ip() -> str:
    """A random loopback address, so fixed ports (8448) can be bound without clashes."""
    return random_loopback_ip()


@dataclass
class LocalDNSServer(asyncio.DatagramProtocol):
    """An authoritative-looking DNS server answering from a table (UDP only).

    Unknown names get NXDOMAIN; known names asked for a missing type get an empty
    NOERROR answer; names in ``servfail`` get SERVFAIL. CNAMEs are followed within the
    table. ``queries`` records ``(name, type)`` for every question received.
    """

    records: dict[tuple[dns.name.Name, int], list[str]] = field(default_factory=dict)
    servfail: set[dns.name.Name] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    transport: asyncio.DatagramTransport | None = None

    def add(self, name: str, rdtype: str, *values: str) -> None:
        """Add records, e.g. ``add("_matrix-fed._tcp.a.test", "SRV", "10 5 8448 b.test.")``."""
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        self.records.setdefault(key, []).extend(values)

    def fail(self, name: str) -> None:
        """Answer SERVFAIL for every question about ``name``."""
        self.servfail.add(dns.name.from_text(name))

    def resolver(self) -> dns.asyncresolver.Resolver:
        """A dnspython resolver that asks only this server, with no cache."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.timeout = 2.0
        resolver.lifetime = 2.0
        return resolver

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an asyncio.DatagramTransport subclass on 3.11, but it has sendto.
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        self.queries.append((name.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdtype)))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            self._answer(response, name, rdtype)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)

    def _answer(self, response: dns.message.Message, name: dns.name.Name, rdtype: int) -> None:
        for _ in range(8):  # CNAME chain length bound
            values = self.records.get((name, rdtype))
            if values:
                response.answer.append(
                    dns.rrset.from_text_list(name, 60, dns.rdataclass.IN, rdtype, values)
                )
                return
            cname = self.records.get((name, dns.rdatatype.CNAME))
            if not cname:
                break
            response.answer.append(
                dns.rrset.from_text_list(name, 60, dns.rdataclass.IN, dns.rdatatype.CNAME, cname)
            )
            name = dns.name.from_text(cname[0])
        if not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)


@pytest.fixture
async def dns_server() -> AsyncIterator[LocalDNSServer]:
    """A ``LocalDNSServer`` on 127.0.0.1 at a random UDP port."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        LocalDNSServer, local_addr=("127.0.0.1", 0)
    )
    protocol.port = transport.get_extra_info("sockname")[1]
    try:
        yield protocol
    finally:
        transport.close()


LocalHTTPSServer = ThreadedServer


HTTPSServerFactory = Callable[..., Awaitable[LocalHTTPSServer]]


@pytest.fixture
async def https_server(tls_ca: trustme.CA, tmp_path: Path) -> AsyncIterator[HTTPSServerFactory]:
    """Start HTTPS servers: ``await https_server(app, names=[...], host=..., port=...)``.

    ``names`` are the certificate's subject names (DNS names or IPs; default the host);
    ``ca`` picks another CA (an untrusted one, say). All are stopped after the test.
    """
    started: list[LocalHTTPSServer] = []
    counter = iter(range(1_000_000))

    async def start(
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        names: list[str] | None = None,
        ca: trustme.CA | None = None,
    ) -> LocalHTTPSServer:
        index = next(counter)
        leaf = (ca or tls_ca).issue_cert(*(names or [host]))
        certfile = tmp_path / f"server{index}.pem"
        keyfile = tmp_path / f"server{index}.key"
        leaf.cert_chain_pems[0].write_to_path(str(certfile))
        leaf.private_key_pem.write_to_path(str(keyfile))
        entry = await start_threaded(
            app, host=host, port=port, certfile=str(certfile), keyfile=str(keyfile)
        )
        started.append(entry)
        return entry

    try:
        yield start
    finally:
        stop_all(started)


@dataclass
class TCPListener:
    """A plain TCP listener that only counts the connections it accepts."""

    host: str
    port: int
    connections: int = 0


@pytest.fixture
async def tcp_listener() -> AsyncIterator[Callable[..., Awaitable[TCPListener]]]:
    """Start TCP listeners that count connections: ``await tcp_listener(host, port)``."""
    servers: list[asyncio.Server] = []

    async def start(host: str = "127.0.0.1", port: int = 0) -> TCPListener:
        listener = TCPListener(host, port)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            listener.connections += 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

        server = await asyncio.start_server(on_connect, host, port)
        listener.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return listener

    try:
        yield start
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


@dataclass
class CannedResponse:
    """What ``RecordingApp`` answers: ``chunks`` are streamed without a Content-Length."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    chunks: list[bytes] | None = None
    delay: float = 0.0


@dataclass
class RecordedRequest:
    method: str
    target: str  # path and query exactly as received
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingApp:
    """A raw ASGI app answering from ``routes`` (by path) and recording every request."""

    routes: dict[str, CannedResponse] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"].decode()
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode()
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(RecordedRequest(scope["method"], target, headers, body))
        canned = self.routes.get(scope["path"], CannedResponse(body=b'{"ok": true}'))
        if canned.delay:
            await asyncio.sleep(canned.delay)
        raw_headers = [(k.encode(), v.encode()) for k, v in canned.headers.items()]
        if canned.chunks is None:
            await send(
                {"type": "http.response.start", "status": canned.status, "headers": raw_headers}
            )
            await send({"type": "http.response.body", "body": canned.body})
            return
        await send({"type": "http.response.start", "status": canned.status, "headers": raw_headers})
        for chunk in canned.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def recording_app() -> RecordingApp:
    """A fresh ``RecordingApp``; set ``.routes[path] = canned_response(...)``."""
    return RecordingApp()


@pytest.fixture
def canned_response() -> type[CannedResponse]:
    """The ``CannedResponse`` class, for building ``RecordingApp`` routes."""
    return CannedResponse


@pytest.fixture
def client_signing_key() -> Any:
    """A fresh ed25519 signing key (``ed25519:test``) for outbound requests."""
    from signedjson.key import generate_signing_key

    return generate_signing_key("test")


# Everything the default deny list holds except loopback, which the tests' servers use.
LOOPBACK = {"127.0.0.0/8", "::1/128"}


@pytest.fixture
def client_settings() -> Callable[..., Any]:
    """Build ``Settings`` for federation client tests: loopback allowed unless overridden."""
    from warden.settings import DEFAULT_DENIED_NETWORKS, Settings

    def factory(**overrides: Any) -> Settings:
        denied = [n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in LOOPBACK]
        values: dict[str, Any] = {
            "homeserver_name": "warden.test",
            "homeserver_denied_networks": denied,
            "federation_timeout_seconds": 10.0,
        }
        values.update(overrides)
        return Settings(**values)

    return factory

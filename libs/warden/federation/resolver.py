"""Server name resolution (Server-Server API v1.18, "Resolving server names").

Turns a server name into the addresses to connect to, the ``Host`` header to send and
the name its TLS certificate must carry:

1. IP literal: that IP, the given port or 8448; ``Host`` is the server name.
2. Hostname with a port: the hostname's A/AAAA records; ``Host`` is the server name.
3. Otherwise ``GET https://<hostname>/.well-known/matrix/server``. A valid ``m.server``
   delegates to another name, resolved as in 1 and 2, else through SRV
   ``_matrix-fed._tcp``, the deprecated ``_matrix._tcp``, then A/AAAA on 8448; ``Host``
   and the certificate name are then the delegated name.
4. Without a usable ``.well-known``: SRV ``_matrix-fed._tcp.<hostname>``, then
   ``_matrix._tcp.<hostname>``, then A/AAAA of the hostname on port 8448.

DNS goes through dnspython's asyncio resolver (its cache honours record TTLs). A server
name's DNS decides how many SRV targets there are, so only the first
``MAX_SRV_TARGETS`` (in RFC 2782 order) are resolved, ``SRV_LOOKUP_CONCURRENCY`` at a
time; a longer answer is counted in ``warden_srv_targets_capped_total``.
``.well-known`` answers are cached by Cache-Control/Expires within the spec's bounds.
The ``.well-known`` request itself connects only to addresses the network guard allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import httpx
import orjson

from warden.federation.errors import FederationError, ResolutionError
from warden.federation.network_guard import GuardedTransport, NetworkGuard, send_to_targets
from warden.telemetry.metrics import SRV_TARGETS_CAPPED

logger = logging.getLogger(__name__)

DEFAULT_FEDERATION_PORT = 8448
WELL_KNOWN_PATH = "/.well-known/matrix/server"

# Cache bounds for .well-known answers: the spec recommends 24 h when the response
# says nothing and at most 48 h; a floor keeps "max-age=0" from costing a fetch per
# request. Failures are cached with exponential backoff up to the spec's hour.
WELL_KNOWN_DEFAULT_CACHE_SECONDS = 24 * 3600
WELL_KNOWN_MAX_CACHE_SECONDS = 48 * 3600
WELL_KNOWN_MIN_CACHE_SECONDS = 5 * 60
WELL_KNOWN_FAILURE_CACHE_SECONDS = 5 * 60
WELL_KNOWN_MAX_FAILURE_CACHE_SECONDS = 3600
WELL_KNOWN_MAX_SIZE = 64 * 1024
# An SRV answer is the remote side's to make long; each target costs two lookups and is
# a connection candidate. Synapse tries them all; ten is far more than any real
# deployment lists, and resolving three at a time bounds the queries in flight.
MAX_SRV_TARGETS = 10
SRV_LOOKUP_CONCURRENCY = 3

_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IPV4_LIKE_RE = re.compile(r"[0-9.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class ServerNameParts:
    """A parsed server name.

    ``host`` is the hostname, or the IP address without brackets; ``port`` is None when
    the server name has none.
    """

    host: str
    port: int | None
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None

    @property
    def is_ip_literal(self) -> bool:
        """Whether the host is an IP address."""
        return self.ip is not None


def parse_server_name(server_name: str) -> ServerNameParts:
    """Split and validate a server name (``host[:port]``, IPv6 in brackets).

    Stricter than the spec's grammar where the grammar admits names no DNS can hold:
    labels are 1-63 letters, digits and inner hyphens, the last label is not all
    digits, and the port is 1-65535. Raises ``ValueError``.
    """
    if not server_name or len(server_name) > 255 + 6:
        raise ValueError(f"invalid server name {server_name!r}: bad length")
    host, port_text = server_name, None
    if server_name.startswith("["):
        end = server_name.find("]")
        if end < 0:
            raise ValueError(f"invalid server name {server_name!r}: unclosed '['")
        host, rest = server_name[1:end], server_name[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid server name {server_name!r}: junk after ']'")
            port_text = rest[1:]
        if not host or not all(c in "0123456789abcdefABCDEF:." for c in host):
            raise ValueError(f"invalid server name {server_name!r}: bad IPv6 literal")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid server name {server_name!r}: bad IPv6 literal") from None
    else:
        if ":" in server_name:
            host, _, port_text = server_name.rpartition(":")
        if _IPV4_LIKE_RE.fullmatch(host):
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"invalid server name {server_name!r}: bad IPv4 literal") from None
        else:
            ip = None
            labels = host.split(".")
            if len(host) > 255 or not all(_LABEL_RE.fullmatch(label) for label in labels):
                raise ValueError(f"invalid server name {server_name!r}: bad hostname")
            if labels[-1].isdigit():
                raise ValueError(f"invalid server name {server_name!r}: numeric last label")
    port: int | None = None
    if port_text is not None:
        if not _PORT_RE.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
            raise ValueError(f"invalid server name {server_name!r}: bad port")
        port = int(port_text)
    return ServerNameParts(host=host, port=port, ip=ip)


@dataclass(frozen=True)
class ResolvedServer:
    """Where and how to reach a server.

    ``targets`` are concrete ``(ip, port)`` candidates in the order to try them.
    ``host_header`` goes in the ``Host`` header; ``tls_server_name`` is the name sent
    as SNI and checked against the certificate (an IP address for IP literals).
    """

    server_name: str
    host_header: str
    tls_server_name: str
    targets: list[tuple[str, int]]


@dataclass
class _WellKnownEntry:
    delegated: str | None
    expires: float
    failures: int


def _cache_seconds(headers: httpx.Headers, now_wall: float) -> float | None:
    """Seconds the response may be cached for, from Cache-Control or Expires."""
    cache_control = headers.get("cache-control", "")
    directives = {}
    for part in cache_control.split(","):
        name, _, value = part.strip().partition("=")
        directives[name.strip().lower()] = value.strip().strip('"')
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    if "max-age" in directives:
        try:
            return float(int(directives["max-age"]))
        except ValueError:
            pass
    expires = headers.get("expires")
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires)
        except (TypeError, ValueError):
            return 0.0  # RFC 9111: an invalid Expires means "already expired"
        return when.timestamp() - now_wall
    return None


def default_dns_resolver() -> dns.asyncresolver.Resolver:
    """The system's resolver configuration (``/etc/resolv.conf``), with a TTL cache."""
    resolver = dns.asyncresolver.Resolver()
    resolver.cache = dns.resolver.LRUCache()
    resolver.lifetime = 10.0
    return resolver


def _srv_order(records: Sequence[Any]) -> list[tuple[str, int]]:
    """RFC 2782 order: ascending priority, weighted random within a priority."""
    by_priority: dict[int, list[Any]] = {}
    for record in records:
        by_priority.setdefault(int(record.priority), []).append(record)
    ordered: list[tuple[str, int]] = []
    for priority in sorted(by_priority):
        remaining = list(by_priority[priority])
        while remaining:
            total = sum(int(r.weight) for r in remaining)
            if total == 0:
                chosen = remaining[0]
            else:
                pick = secrets.randbelow(total + 1)
                running = 0
                chosen = remaining[-1]
                for record in remaining:
                    running += int(record.weight)
                    if running >= pick:
                        chosen = record
                        break
            remaining.remove(chosen)
            ordered.append((chosen.target.to_text(omit_final_dot=True), int(chosen.port)))
    return ordered


class ServerNameResolver:
    """Resolves server names as the spec describes; see the module docstring.

    ``http`` must be an ``httpx.AsyncClient`` over a ``GuardedTransport`` (one is made
    from ``ssl_context`` when not given, and closed by ``aclose``). ``default_port``
    and ``well_known_port`` exist so tests can use unprivileged ports; production
    keeps 8448 and 443.
    """

    def __init__(
        self,
        guard: NetworkGuard,
        *,
        http: httpx.AsyncClient | None = None,
        ssl_context: ssl.SSLContext | None = None,
        dns_resolver: dns.asyncresolver.Resolver | None = None,
        default_port: int = DEFAULT_FEDERATION_PORT,
        well_known_port: int = 443,
        well_known_timeout: float = 10.0,
        max_redirects: int = 3,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        max_srv_targets: int = MAX_SRV_TARGETS,
    ) -> None:
        self.guard = guard
        self._owns_http = http is None
        if http is None:
            transport = GuardedTransport(guard, ssl_context or ssl.create_default_context())
            http = httpx.AsyncClient(transport=transport, trust_env=False)
        self.http = http
        self.dns = dns_resolver or default_dns_resolver()
        self.default_port = default_port
        self.well_known_port = well_known_port
        self.well_known_timeout = well_known_timeout
        self.max_redirects = max_redirects
        self.cache_size = cache_size
        self.max_srv_targets = max_srv_targets
        self.clock = clock
        self._well_known: OrderedDict[str, _WellKnownEntry] = OrderedDict()

    async def aclose(self) -> None:
        """Close the HTTP client if this resolver made it."""
        if self._owns_http:
            await self.http.aclose()

    async def resolve(self, server_name: str) -> ResolvedServer:
        """Resolve ``server_name``.

        Raises ``ValueError`` for an invalid server name and ``ResolutionError`` when
        DNS yields no address.
        """
        parts = parse_server_name(server_name)
        if parts.ip is not None or parts.port is not None:
            return await self._resolve_direct(server_name, server_name, parts)

        delegated = await self.get_well_known(parts.host)
        if delegated is not None:
            d_parts = parse_server_name(delegated)
            if d_parts.ip is not None or d_parts.port is not None:
                return await self._resolve_direct(server_name, delegated, d_parts)
            return await self._resolve_srv_or_default(server_name, d_parts.host)
        return await self._resolve_srv_or_default(server_name, parts.host)

    async def _resolve_direct(
        self, server_name: str, name: str, parts: ServerNameParts
    ) -> ResolvedServer:
        """Steps 1, 2, 3.1 and 3.2: an IP literal or a hostname with an explicit port."""
        port = parts.port or self.default_port
        if parts.ip is not None:
            targets = [(str(parts.ip), port)]
        else:
            ips = await self._lookup_addresses(server_name, parts.host)
            targets = [(ip, port) for ip in ips]
        return ResolvedServer(server_name, name, parts.host, targets)

    async def _resolve_srv_or_default(self, server_name: str, hostname: str) -> ResolvedServer:
        """Steps 3.3-3.5 and 4-6: SRV records, else the hostname on the default port."""
        for service in ("_matrix-fed._tcp", "_matrix._tcp"):
            srv = await self._lookup_srv(server_name, f"{service}.{hostname}")
            if srv:
                targets = await self._srv_targets(server_name, srv)
                return ResolvedServer(server_name, hostname, hostname, targets)
        ips = await self._lookup_addresses(server_name, hostname)
        targets = [(ip, self.default_port) for ip in ips]
        return ResolvedServer(server_name, hostname, hostname, targets)

    async def _srv_targets(
        self, server_name: str, srv: list[tuple[str, int]]
    ) -> list[tuple[str, int]]:
        if len(srv) > self.max_srv_targets:
            SRV_TARGETS_CAPPED.inc()
            logger.warning(
                "too many SRV targets; trying the first ones only",
                extra={
                    "server_name": server_name,
                    "srv_targets": len(srv),
                    "tried": self.max_srv_targets,
                },
            )
            srv = srv[: self.max_srv_targets]
        slots = asyncio.Semaphore(SRV_LOOKUP_CONCURRENCY)

        async def lookup(host: str) -> list[str]:
            async with slots:
                return await self._lookup_addresses(server_name, host)

        results = await asyncio.gather(*(lookup(host) for host, _ in srv), return_exceptions=True)
        targets: list[tuple[str, int]] = []
        errors: list[BaseException] = []
        for (_, port), result in zip(srv, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                errors.append(result)
                continue
            targets.extend((ip, port) for ip in result)
        if not targets:
            raise ResolutionError(
                server_name, f"no SRV target resolved ({'; '.join(map(str, errors))})"
            )
        return targets

    async def _lookup_srv(self, server_name: str, qname: str) -> list[tuple[str, int]]:
        """SRV records, ordered; empty when there are none."""
        try:
            answer = await self.dns.resolve(qname, "SRV", raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            # Guessing a port after a failed lookup could reach the wrong service.
            raise ResolutionError(server_name, f"SRV lookup of {qname} failed: {exc}") from exc
        if answer.rrset is None:
            return []
        records = list(answer.rrset)
        # A single "." target says the service is not offered there (RFC 2782).
        if len(records) == 1 and records[0].target == dns.name.root:
            return []
        return _srv_order([r for r in records if r.target != dns.name.root])

    async def _lookup_addresses(self, server_name: str, hostname: str) -> list[str]:
        """A then AAAA addresses of ``hostname`` (CNAMEs followed by the resolver)."""
        lowered = hostname.lower().rstrip(".")
        if lowered == "localhost" or lowered.endswith(".localhost"):
            return ["127.0.0.1", "::1"]  # RFC 6761; the guard still decides
        results = await asyncio.gather(
            self._query_ips(hostname, "A"),
            self._query_ips(hostname, "AAAA"),
            return_exceptions=True,
        )
        addresses: list[str] = []
        errors: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, dns.exception.DNSException):
                    raise result
                errors.append(str(result) or type(result).__name__)
            else:
                addresses.extend(result)
        if not addresses:
            detail = "; ".join(errors) if errors else "no A or AAAA records"
            raise ResolutionError(server_name, f"cannot resolve {hostname}: {detail}")
        return addresses

    async def _query_ips(self, hostname: str, rdtype: str) -> list[str]:
        try:
            answer = await self.dns.resolve(hostname, rdtype, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        if answer.rrset is None:
            return []
        return [r.address for r in answer.rrset]

    async def get_well_known(self, hostname: str) -> str | None:
        """The server name ``hostname`` delegates to, or None; cached."""
        key = hostname.lower()
        now = self.clock()
        entry = self._well_known.get(key)
        if entry is not None and entry.expires > now:
            self._well_known.move_to_end(key)
            return entry.delegated
        failures = entry.failures if entry is not None else 0
        delegated, ttl = await self._fetch_well_known(hostname)
        if delegated is None:
            failures += 1
            ttl = min(
                WELL_KNOWN_FAILURE_CACHE_SECONDS * 2 ** min(failures - 1, 16),
                WELL_KNOWN_MAX_FAILURE_CACHE_SECONDS,
            )
        else:
            failures = 0
        self._well_known[key] = _WellKnownEntry(delegated, self.clock() + ttl, failures)
        self._well_known.move_to_end(key)
        while len(self._well_known) > self.cache_size:
            self._well_known.popitem(last=False)
        return delegated

    async def _fetch_well_known(self, hostname: str) -> tuple[str | None, float]:
        """Fetch and validate; returns the delegated name (None on any failure) and TTL."""
        url = httpx.URL(
            scheme="https", host=hostname, port=self.well_known_port, path=WELL_KNOWN_PATH
        )
        try:
            async with asyncio.timeout(self.well_known_timeout):
                for _ in range(self.max_redirects + 1):
                    response_or_url = await self._fetch_once(hostname, url)
                    if isinstance(response_or_url, httpx.URL):
                        url = response_or_url
                        continue
                    return response_or_url
                logger.info("well-known of %s: too many redirects", hostname)
        except TimeoutError:
            logger.info("well-known of %s: timed out", hostname)
        except (FederationError, ValueError) as exc:
            logger.info("well-known of %s: %s", hostname, exc)
        return None, 0.0

    async def _fetch_once(
        self, hostname: str, url: httpx.URL
    ) -> httpx.URL | tuple[str | None, float]:
        """One request; a redirect target URL, or the validated result."""
        if url.scheme != "https":
            raise ValueError(f"refusing non-https well-known URL {url}")
        port = url.port or 443
        host = url.host
        ip: str | None = None
        with contextlib.suppress(ValueError):
            ip = str(ipaddress.ip_address(host))
        ips = [ip] if ip is not None else await self._lookup_addresses(hostname, host)
        host_header = f"[{host}]" if ":" in host else host
        if url.port is not None and url.port != 443:
            host_header += f":{url.port}"
        response = await send_to_targets(
            self.http,
            self.guard,
            destination=hostname,
            method="GET",
            targets=[(a, port) for a in ips],
            host_header=host_header,
            tls_server_name=host,
            target=url.raw_path.decode("ascii"),
            headers={"Accept": "application/json"},
            http_timeout=httpx.Timeout(self.well_known_timeout),
        )
        try:
            if response.is_redirect and "location" in response.headers:
                return url.join(response.headers["location"])
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > WELL_KNOWN_MAX_SIZE:
                    raise ValueError("response too large")
        finally:
            await response.aclose()
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ValueError("response is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("m.server"), str):
            raise ValueError("response has no m.server string")
        delegated: str = document["m.server"]
        parse_server_name(delegated)  # ValueError when invalid: fall back as for errors
        seconds = _cache_seconds(response.headers, time.time())
        if seconds is None:
            seconds = WELL_KNOWN_DEFAULT_CACHE_SECONDS
        seconds = max(WELL_KNOWN_MIN_CACHE_SECONDS, min(seconds, WELL_KNOWN_MAX_CACHE_SECONDS))
        return delegated, seconds

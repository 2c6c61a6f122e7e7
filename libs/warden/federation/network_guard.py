"""The outbound SSRF guard, enforced where connections are made.

Other servers choose, through DNS and ``.well-known``, which addresses Warden connects
to, so a hostile server could point us at our own private network. Every outbound
federation connection therefore goes to an IP address that was checked against
``PS_HOMESERVER_ALLOWED_NETWORKS`` / ``PS_HOMESERVER_DENIED_NETWORKS`` immediately
before: names are resolved by us (``resolver.py``), each address is checked, and the
HTTP layer is handed the IP literal, so nothing below us resolves a name again and DNS
rebinding between check and connect has nothing to change. The hostname is used only
for TLS (SNI and certificate verification) and the ``Host`` header.

``GuardedTransport`` is the httpx transport that enforces this: it refuses any URL
whose host is not an IP literal, checks the IP, and keeps a separate connection pool
per TLS identity, so a connection verified for one server is never reused for another
server that happens to share the IP and port. ``send_to_targets`` tries a resolved
server's candidate addresses in order.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from warden.federation.errors import (
    DeniedDestination,
    FederationConnectError,
    FederationError,
    FederationTimeout,
    InvalidResponse,
    ResolutionError,
    TemporaryFederationError,
    TLSVerificationError,
)
from warden.settings import Settings

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 ranges that carry an IPv4 address in their last 32 bits (NAT64 well-known
# prefix) or in bits 16-48 (6to4). Traffic to them ends up at that IPv4 address, so the
# IPv4 address has to pass the rules as well.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _as_ipv4_if_alias(ip: IPAddress) -> IPAddress:
    """``::ffff:a.b.c.d`` (mapped) and ``::a.b.c.d`` (compatible) are that IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        # IPv4-compatible (deprecated, ::/96); :: and ::1 are IPv6's own.
        if int(ip) >> 32 == 0 and int(ip) > 1:
            return ipaddress.IPv4Address(int(ip))
    return ip


class NetworkGuard:
    """Allow and deny lists of networks for outbound connections.

    An address is permitted when it is inside some allowed network and inside no
    denied network (deny wins). IPv4-mapped and IPv4-compatible IPv6 addresses are
    judged as the IPv4 address they stand for; 6to4 and NAT64 addresses must pass both
    as themselves and as the IPv4 address they embed.
    """

    def __init__(self, allowed: Iterable[str], denied: Iterable[str]) -> None:
        # Settings validates CIDRs at start; ip_network raises here for direct callers.
        self.allowed: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=True) for c in allowed
        )
        self.denied: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=True) for c in denied
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> NetworkGuard:
        """The guard configured by ``PS_HOMESERVER_ALLOWED/DENIED_NETWORKS``."""
        return cls(settings.homeserver_allowed_networks, settings.homeserver_denied_networks)

    def _passes(self, ip: IPAddress) -> bool:
        if any(ip.version == net.version and ip in net for net in self.denied):
            return False
        return any(ip.version == net.version and ip in net for net in self.allowed)

    def is_allowed(self, ip: str | IPAddress) -> bool:
        """Whether a connection to ``ip`` is permitted. Raises ``ValueError`` for non-IPs."""
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        address = _as_ipv4_if_alias(address)
        if not self._passes(address):
            return False
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is not None and not self._passes(embedded):
                return False
        return True

    def check(self, ip: str | IPAddress, *, destination: str | None = None) -> None:
        """Raise ``DeniedDestination`` unless a connection to ``ip`` is permitted."""
        try:
            allowed = self.is_allowed(ip)
        except ValueError:
            raise DeniedDestination(
                destination or str(ip), str(ip), f"{ip!r} is not an IP address"
            ) from None
        if not allowed:
            raise DeniedDestination(destination or str(ip), str(ip))


@dataclass
class _Pool:
    transport: httpx.AsyncHTTPTransport
    busy: int = 0
    retired: bool = False


class _ReleasingStream(httpx.AsyncByteStream):
    """Wraps a response stream to tell the transport when the response is finished."""

    def __init__(self, inner: httpx.AsyncByteStream, owner: GuardedTransport, pool: _Pool):
        self._inner = inner
        self._owner = owner
        self._pool: _Pool | None = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                await self._owner._release(pool)


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that only connects to guarded IP literals.

    The request URL's host must be an IP address; the TLS name comes from the
    ``sni_hostname`` request extension (the IP itself when absent). Connections are
    pooled per TLS name; at most ``max_pools`` idle pools are kept (least recently used
    first out).
    """

    def __init__(
        self,
        guard: NetworkGuard,
        ssl_context: ssl.SSLContext,
        *,
        limits: httpx.Limits | None = None,
        max_pools: int = 512,
    ) -> None:
        self.guard = guard
        self.ssl_context = ssl_context
        self.limits = limits or httpx.Limits(
            max_connections=20, max_keepalive_connections=10, keepalive_expiry=30.0
        )
        self.max_pools = max_pools
        self._pools: OrderedDict[str, _Pool] = OrderedDict()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Check the destination IP, then send through the pool for its TLS name."""
        if self._closed:
            raise RuntimeError("transport is closed")
        host = request.url.host
        sni = request.extensions.get("sni_hostname")
        tls_name = sni if isinstance(sni, str) and sni else host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            # A hostname here would be resolved again by the connection layer, after
            # (and independently of) our check: never allowed.
            raise DeniedDestination(
                tls_name, host, f"refusing to connect to {host!r}: not an IP address"
            ) from None
        self.guard.check(ip, destination=tls_name)
        pool = await self._acquire(tls_name)
        try:
            response = await pool.transport.handle_async_request(request)
        except BaseException:
            await self._release(pool)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, self, pool),
            extensions=response.extensions,
        )

    async def _acquire(self, tls_name: str) -> _Pool:
        pool = self._pools.get(tls_name)
        if pool is None:
            pool = _Pool(
                httpx.AsyncHTTPTransport(
                    verify=self.ssl_context, trust_env=False, limits=self.limits, http2=False
                )
            )
            self._pools[tls_name] = pool
        else:
            self._pools.move_to_end(tls_name)
        # Marked busy before evicting, so the pool about to be used is never the one closed.
        pool.busy += 1
        await self._evict()
        return pool

    async def _evict(self) -> None:
        # Only idle pools are closed; busy ones may push the count over for a while.
        excess = len(self._pools) - self.max_pools
        for name in list(self._pools):
            if excess <= 0:
                break
            pool = self._pools.get(name)  # another task may have evicted it meanwhile
            if pool is not None and pool.busy == 0:
                del self._pools[name]
                excess -= 1
                await pool.transport.aclose()

    async def _release(self, pool: _Pool) -> None:
        pool.busy -= 1
        if pool.busy == 0 and pool.retired:
            await pool.transport.aclose()

    async def aclose(self) -> None:
        """Close every pool; pools with responses still open close when those do."""
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            pool.retired = True
            if pool.busy == 0:
                await pool.transport.aclose()

    def pool_count(self) -> int:
        """How many per-TLS-name pools exist (for tests and metrics)."""
        return len(self._pools)


def _tls_verification_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        current = current.__cause__ or current.__context__
    return None


def map_httpx_error(destination: str, exc: httpx.HTTPError) -> FederationError:
    """Translate an httpx failure into the federation error taxonomy."""
    if isinstance(exc, httpx.TimeoutException):
        return FederationTimeout(destination, f"timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        tls = _tls_verification_failure(exc)
        if tls is not None:
            return TLSVerificationError(
                destination, f"TLS certificate verification failed: {tls.verify_message}"
            )
        return FederationConnectError(destination, f"connection failed: {exc}")
    if isinstance(exc, httpx.NetworkError):
        return FederationConnectError(destination, f"connection lost: {exc}")
    if isinstance(exc, httpx.DecodingError):
        return InvalidResponse(destination, f"undecodable response body: {exc}")
    return TemporaryFederationError(destination, f"{type(exc).__name__}: {exc}")


async def send_to_targets(
    http: httpx.AsyncClient,
    guard: NetworkGuard,
    *,
    destination: str,
    method: str,
    targets: Sequence[tuple[str, int]],
    host_header: str,
    tls_server_name: str,
    target: str,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    http_timeout: httpx.Timeout | None = None,
) -> httpx.Response:
    """Send one request to the first candidate address that accepts a connection.

    ``target`` is the percent-encoded path and query, sent byte for byte (``ValueError``
    if httpx would change it, since X-Matrix signs it). Denied candidates are skipped
    without connecting; a candidate that cannot be connected to (refused, connect
    timeout, bad certificate) is followed by the next. Once a request has been sent,
    its failure is final. Returns a streaming response: the caller must close it.
    Raises ``DeniedDestination`` when every candidate was denied, otherwise the last
    connection failure.
    """
    if not targets:
        raise ResolutionError(destination, "no addresses to connect to")
    failures: list[FederationError] = []
    for ip, port in targets:
        try:
            guard.check(ip, destination=destination)
        except DeniedDestination as exc:
            logger.info("not connecting to %s at %s: denied by network guard", destination, ip)
            failures.append(exc)
            continue
        url = httpx.URL(scheme="https", host=ip, port=port, raw_path=target.encode("ascii"))
        if url.raw_path != target.encode("ascii"):
            raise ValueError(f"request target {target!r} is not percent-encoded")
        request_headers = {"Host": host_header}
        if headers:
            request_headers.update(headers)
        extensions: dict[str, object] = {"sni_hostname": tls_server_name}
        if http_timeout is not None:
            extensions["timeout"] = http_timeout.as_dict()
        request = http.build_request(
            method, url, headers=request_headers, content=content, extensions=extensions
        )
        try:
            return await http.send(request, stream=True, follow_redirects=False)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = map_httpx_error(destination, exc)
            logger.info("connecting to %s at [%s]:%d failed: %s", destination, ip, port, failure)
            failures.append(failure)
        except httpx.HTTPError as exc:
            raise map_httpx_error(destination, exc) from exc
    connect_failures = [f for f in failures if not isinstance(f, DeniedDestination)]
    if connect_failures:
        raise connect_failures[-1]
    raise failures[0]

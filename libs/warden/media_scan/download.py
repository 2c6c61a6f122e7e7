"""Downloading media through the homeserver's authenticated media API, guarded and capped.

``GET {PS_HOMESERVER_MEDIA_CLIENT_URL}/_matrix/client/v1/media/download/{server}/{id}``
with the configured access token. The server name and media ID come from events anyone
can send, so they only ever fill the path (percent-encoded); the host is the operator's.
Still, every connection goes to an IP address checked against
``PS_HOMESERVER_MEDIA_CLIENT_ALLOWED/DENIED_NETWORKS`` just before connecting (the
federation ``GuardedTransport``), so a DNS answer that changes to a private address is
refused. Redirects are followed only to the same scheme, host and port (a media
repository may redirect within itself); a redirect elsewhere (an object store, say)
is refused rather than sending the access token or trusting another host's bytes.

The body is streamed and abandoned past ``PS_HMA_MAX_MEDIA_BYTES``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

import httpx

from warden.federation.client import build_ssl_context
from warden.federation.errors import DeniedDestination
from warden.federation.network_guard import GuardedTransport, NetworkGuard
from warden.media_scan.extract import MediaRef
from warden.outbound_http import USER_AGENT
from warden.policy.dependency_failures import DependencyUnavailable

_MAX_REDIRECTS = 3
DOWNLOAD_PATH = "/_matrix/client/v1/media/download/"


class MediaUnavailable(DependencyUnavailable):
    """The media could not be fetched now (network, homeserver error, refused address)."""


class MediaTooLarge(Exception):
    """The media is larger than ``PS_HMA_MAX_MEDIA_BYTES``: it is not scanned.

    Not a dependency failure: asking again would find the same size. The HMA filter's
    ``hma_fail_secure`` key decides what it means (refused by default).
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"media of {size}+ bytes is over the {limit}-byte limit")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class Downloaded:
    """A downloaded piece of media: its bytes, nothing the server said about them."""

    data: bytes


def download_url(base_url: str, ref: MediaRef) -> str:
    """The authenticated download URL of ``ref`` under the client API ``base_url``."""
    server = urllib.parse.quote(ref.server_name, safe="")
    media_id = urllib.parse.quote(ref.media_id, safe="")
    return base_url.rstrip("/") + DOWNLOAD_PATH + f"{server}/{media_id}"


class MediaDownloader:
    """Fetches media from one homeserver's client API; one per process."""

    def __init__(
        self,
        base_url: str,
        access_token: str,
        guard: NetworkGuard,
        *,
        max_bytes: int,
        timeout_seconds: float,
        ca_file: str | None = None,
    ) -> None:
        parsed = httpx.URL(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self.base_url = base_url
        self.max_bytes = max_bytes
        self._headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        self._transport = GuardedTransport(guard, build_ssl_context(verify=True, ca_file=ca_file))
        self._client = httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(timeout_seconds),
            follow_redirects=False,
            trust_env=False,
        )
        self._guard = guard

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def download(self, ref: MediaRef) -> Downloaded:
        """The media's bytes. Raises ``MediaUnavailable`` or ``MediaTooLarge``."""
        url = httpx.URL(download_url(self.base_url, ref))
        origin = (url.scheme, url.host, url.port)
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                location = await self._get(url)
            except httpx.HTTPError as exc:
                raise MediaUnavailable(f"downloading {ref.uri}: {type(exc).__name__}") from exc
            except DeniedDestination as exc:
                raise MediaUnavailable(f"downloading {ref.uri}: {exc}") from exc
            if isinstance(location, Downloaded):
                return location
            url = url.join(location)
            if (url.scheme, url.host, url.port) != origin:
                raise MediaUnavailable(
                    f"downloading {ref.uri}: redirected to another host (not followed)"
                )
        raise MediaUnavailable(f"downloading {ref.uri}: too many redirects")

    async def _get(self, url: httpx.URL) -> Downloaded | str:
        """One request: the media, or the ``Location`` of a redirect."""
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await _resolve(host, port)
        allowed = [ip for ip in addresses if self._guard.is_allowed(ip)]
        if not allowed:
            raise DeniedDestination(host, addresses[0] if addresses else host)
        last: Exception | None = None
        for ip in allowed:
            target = url.copy_with(host=ip)
            request = self._client.build_request(
                "GET",
                target,
                headers={**self._headers, "Host": url.netloc.decode("ascii")},
                extensions={"sni_hostname": host},
            )
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc  # the next address may answer
                continue
            try:
                return await self._read(response)
            finally:
                await response.aclose()
        assert last is not None
        raise last

    async def _read(self, response: httpx.Response) -> Downloaded | str:
        status = response.status_code
        if status in (301, 302, 303, 307, 308):
            location = response.headers.get("location")
            if not location:
                raise MediaUnavailable(f"HTTP {status} without a Location")
            return str(location)
        if status != 200:
            raise MediaUnavailable(f"the homeserver answered HTTP {status}")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise MediaTooLarge(int(declared), self.max_bytes)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise MediaTooLarge(size, self.max_bytes)
            chunks.append(chunk)
        return Downloaded(b"".join(chunks))


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (itself when it is an IP literal)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MediaUnavailable(f"resolving {host}: {exc}") from exc
    seen: list[str] = []
    for info in infos:
        ip = str(info[4][0])
        if ip not in seen:
            seen.append(ip)
    return seen

"""Where a webhook may go, and sending it there without being steered elsewhere.

A community chooses its ``webhook_url``, so Warden checks it twice:

1. The URL: https only, no credentials in it, and its host in
   ``PS_ALLOWED_WEBHOOK_DOMAINS``. An entry matches that exact host and any subdomain
   of it (``element.ems.host`` allows ``hooks.element.ems.host``), as policyserv's
   "hostnames/domains" wording and its default suggest; an IP address in the URL must
   be listed exactly.
2. The connection: the host is resolved here and every address is checked with the
   federation SSRF guard (``PS_HOMESERVER_ALLOWED_NETWORKS`` / ``..._DENIED_NETWORKS``)
   immediately before connecting to that IP, so an allowed name pointing at an internal
   address is refused, and DNS cannot change the answer between check and connect.

Redirects are never followed (a 3xx is a permanent failure). The whole attempt is
bounded by ``PS_WEBHOOK_TIMEOUT_SECONDS`` and at most 64 KiB of the answer is read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import orjson

from warden.federation.client import build_ssl_context
from warden.federation.errors import (
    DeniedDestination,
    FederationError,
    TemporaryFederationError,
)
from warden.federation.network_guard import GuardedTransport, NetworkGuard, send_to_targets
from warden.outbound_http import (
    USER_AGENT,
    Attempt,
    Result,
    attempt_from_response,
)
from warden.settings import Settings


class NotAllowed(ValueError):
    """The webhook URL may not be used; the message says why (never the whole URL)."""


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL, split the way the guarded sender needs it."""

    host: str  # lower case, no trailing dot; IPv6 without brackets
    port: int
    target: str  # percent-encoded path and query, sent as is
    host_header: str

    @property
    def is_ip(self) -> bool:
        """True when the URL names an IP address rather than a host name."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether ``host`` is an allowed domain or a subdomain of one (IPs: exact only)."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return any(host == d or host.endswith("." + d) for d in allowed if d)
    return host in allowed


def check_webhook_url(url: str, allowed: Sequence[str]) -> WebhookTarget:
    """Parse and check a webhook URL; raises ``NotAllowed`` with the reason."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise NotAllowed(f"not a valid URL ({type(exc).__name__})") from None
    if parsed.scheme != "https":
        raise NotAllowed(f"scheme {parsed.scheme!r} is not https")
    if parsed.userinfo:
        raise NotAllowed("credentials in the URL are not allowed")
    host = parsed.host.lower().rstrip(".")
    if not host:
        raise NotAllowed("no host")
    if not host_allowed(host, allowed):
        raise NotAllowed(f"host {host!r} is not in PS_ALLOWED_WEBHOOK_DOMAINS")
    port = parsed.port or 443
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == 443 else f"{shown}:{port}"
    target = parsed.raw_path.decode("ascii") or "/"
    return WebhookTarget(host, port, target, host_header)


class WebhookSender:
    """POSTs JSON to checked webhook targets through the SSRF-guarded transport."""

    def __init__(self, settings: Settings) -> None:
        self.guard = NetworkGuard.from_settings(settings)
        ssl_context = build_ssl_context(verify=True, ca_file=settings.webhook_ca_file)
        self._timeout = settings.webhook_timeout_seconds
        self._http = httpx.AsyncClient(
            transport=GuardedTransport(self.guard, ssl_context),
            timeout=self._timeout,
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        """Close every connection."""
        await self._http.aclose()

    async def _addresses(self, target: WebhookTarget) -> list[tuple[str, int]]:
        if target.is_ip:
            return [(target.host, target.port)]
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        seen: list[tuple[str, int]] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            entry = (str(sockaddr[0]), target.port)
            if entry not in seen:
                seen.append(entry)
        return seen

    async def post(
        self, target: WebhookTarget, payload: dict[str, str], *, idempotency_key: str
    ) -> Attempt:
        """One POST attempt, classified. Raises ``NotAllowed`` when the guard refuses
        every address the host resolved to."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            # Lets a receiver drop a repeat of a delivery it already took (see main.py).
            "Idempotency-Key": idempotency_key,
        }
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    addresses = await self._addresses(target)
                except OSError as exc:  # socket.gaierror included
                    return Attempt(Result.TEMPORARY, None, f"cannot resolve host: {exc}"[:200])
                response = await send_to_targets(
                    self._http,
                    self.guard,
                    destination=target.host,
                    method="POST",
                    targets=addresses,
                    host_header=target.host_header,
                    tls_server_name=target.host,
                    target=target.target,
                    headers=headers,
                    content=orjson.dumps(payload),
                )
                try:
                    return await attempt_from_response(response)
                except httpx.HTTPError:
                    # The answer's status is known; only reading its body failed.
                    status = response.status_code
                    result = Result.OK if 200 <= status < 300 else Result.TEMPORARY
                    return Attempt(result, status, f"HTTP {status} (body unreadable)")
                finally:
                    await response.aclose()
        except TimeoutError:
            return Attempt(Result.TEMPORARY, None, f"timed out after {self._timeout}s")
        except DeniedDestination as exc:
            raise NotAllowed(f"refused by the network guard: {exc.reason}") from None
        except TemporaryFederationError as exc:
            return Attempt(Result.TEMPORARY, None, exc.reason[:200])
        except FederationError as exc:
            return Attempt(Result.PERMANENT, None, exc.reason[:200])
        except ValueError as exc:  # a target httpx would have rewritten
            return Attempt(Result.PERMANENT, None, str(exc)[:200])

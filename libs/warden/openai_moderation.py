"""A client for OpenAI-compatible moderation services (``POST <base>/moderations``).

Used by the ``openai_filter`` filter (``warden.filters.openai_moderation``). One client
per filter-worker process, made from the settings (``OpenAIModeration.from_settings``):

- the service is ``PS_OPENAI_FILTER_BASE_URL`` (OpenAI's API by default, or any server
  speaking its moderation endpoint, a locally served model included) and the model
  ``PS_OPENAI_FILTER_MODEL``; the key (``PS_OPENAI_FILTER_API_KEY`` or ``..._FILE``) is
  sent as a Bearer token and never logged, nor is anything the service answers besides
  its status (an error body may echo part of the key);
- connections go through the federation SSRF guard, as webhooks do: the host is resolved
  here and each address checked against ``PS_HOMESERVER_ALLOWED_NETWORKS`` /
  ``..._DENIED_NETWORKS`` immediately before connecting to it, except that addresses in
  ``PS_OPENAI_FILTER_ALLOWED_NETWORKS`` are allowed (the operator's own model server);
  redirects are never followed and at most ``MAX_RESPONSE_BYTES`` of an answer is read;
- at most ``PS_OPENAI_FILTER_MAX_CONCURRENCY`` events are classified at once: the next
  one fails at once rather than queueing behind a slow service, and each event is
  bounded by ``PS_OPENAI_FILTER_TIMEOUT_SECONDS``.

Every failure (timeout, refused or lost connection, any non-2xx answer, an answer that
is not a moderation result, the concurrency cap) raises ``DependencyUnavailable``: what
the service could not tell says nothing about the event, so it never becomes a verdict
(see ``warden.policy.dependency_failures``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from prometheus_client import Counter, Histogram

from warden.federation.client import build_ssl_context
from warden.federation.errors import DeniedDestination
from warden.federation.network_guard import GuardedTransport, IPAddress, IPNetwork, NetworkGuard
from warden.outbound_http import USER_AGENT, read_capped
from warden.policy import slow_lane
from warden.policy.dependency_failures import DependencyUnavailable
from warden.settings import Settings

logger = logging.getLogger(__name__)

# A moderation result is a few KiB (a score per category); anything larger is not one.
MAX_RESPONSE_BYTES = 256 * 1024

REQUESTS = Counter(
    "warden_openai_moderation_requests_total",
    "Requests to the OpenAI-compatible moderation service, by outcome.",
    ["outcome"],
)
REQUEST_SECONDS = Histogram(
    "warden_openai_moderation_seconds",
    "Time one moderation request took, every outcome.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Outcomes (the counter's label values).
FLAGGED = "flagged"
NOT_FLAGGED = "not_flagged"
TIMEOUT = "timeout"
RATE_LIMITED = "rate_limited"  # 429
SERVER_ERROR = "server_error"  # 5xx
REJECTED = "rejected"  # any other non-2xx: a bad key, model or URL
BAD_RESPONSE = "bad_response"  # 2xx that is not a moderation result
CONNECTION_FAILED = "connection_failed"
DENIED = "denied"  # the network guard refused every address
SATURATED = "saturated"  # the concurrency cap was reached; nothing sent


def check_base_url(url: str) -> httpx.URL:
    """``url`` parsed, or ``ValueError``: http(s), a host, no credentials or query."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"not a valid URL ({type(exc).__name__})") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parsed.scheme!r} is not http or https")
    if not parsed.host:
        raise ValueError("no host")
    if parsed.userinfo:
        raise ValueError("credentials in the URL are not allowed (use the API key setting)")
    if parsed.query or parsed.fragment:
        raise ValueError("a query or fragment is not allowed")
    return parsed


@dataclass(frozen=True)
class Moderation:
    """The service's judgement of one text."""

    flagged: bool
    categories: frozenset[str]  # the categories the service set to true


class _ServiceGuard(NetworkGuard):
    """The federation guard, plus networks the operator allows for this service only."""

    def __init__(
        self, allowed: Iterable[str], denied: Iterable[str], exempt: Iterable[str]
    ) -> None:
        super().__init__(allowed, denied)
        self.exempt: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=True) for c in exempt
        )

    def is_allowed(self, ip: str | IPAddress) -> bool:
        """Allowed when in an exempt network (exactly as written), else as federation."""
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        if any(address.version == n.version and address in n for n in self.exempt):
            return True
        return super().is_allowed(address)


def _read_key(settings: Settings) -> str:
    if settings.openai_filter_api_key_file:
        if settings.openai_filter_api_key:
            raise ValueError(
                "set PS_OPENAI_FILTER_API_KEY or PS_OPENAI_FILTER_API_KEY_FILE, not both"
            )
        with open(settings.openai_filter_api_key_file, encoding="utf-8") as f:
            return f.read().strip()
    return settings.openai_filter_api_key.strip()


class OpenAIModeration:
    """Classifies texts with an OpenAI-compatible moderation endpoint (see the module)."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        timeout_seconds: float,
        max_concurrency: int,
        guard: NetworkGuard,
        ca_file: str | None = None,
    ) -> None:
        url = check_base_url(base_url)
        self.model = model
        self.timeout_seconds = timeout_seconds
        self.max_concurrency = max_concurrency
        self.guard = guard
        self._api_key = api_key
        self._scheme = url.scheme
        self._host = url.host.lower().rstrip(".")
        self._port = url.port or (443 if url.scheme == "https" else 80)
        shown = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if url.scheme == "https" else 80)
        self._host_header = shown if default_port else f"{shown}:{self._port}"
        self._target = url.raw_path.decode("ascii").rstrip("/") + "/moderations"
        self._in_flight = 0
        self._http = httpx.AsyncClient(
            transport=GuardedTransport(
                guard,
                build_ssl_context(verify=True, ca_file=ca_file),
                limits=httpx.Limits(
                    max_connections=max_concurrency * 2, max_keepalive_connections=max_concurrency
                ),
            ),
            timeout=timeout_seconds,
            follow_redirects=False,
            trust_env=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIModeration | None:
        """The configured client, or None when no API key is set (the filter is off).

        Raises ``ValueError`` (or ``OSError`` for an unreadable key file) on a bad setting.
        """
        key = _read_key(settings)
        if not key:
            return None
        return cls(
            api_key=key,
            base_url=settings.openai_filter_base_url,
            model=settings.openai_filter_model,
            timeout_seconds=settings.openai_filter_timeout_seconds,
            max_concurrency=settings.openai_filter_max_concurrency,
            guard=_ServiceGuard(
                settings.homeserver_allowed_networks,
                settings.homeserver_denied_networks,
                settings.openai_filter_allowed_networks,
            ),
            ca_file=settings.openai_filter_ca_file,
        )

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"OpenAIModeration(base={self._scheme}://{self._host_header}, model={self.model!r})"

    @property
    def in_flight(self) -> int:
        """Events being classified now."""
        return self._in_flight

    async def aclose(self) -> None:
        """Close every connection."""
        await self._http.aclose()

    async def moderate(self, texts: Sequence[str]) -> list[Moderation]:
        """Classify each text (one request each, concurrently); results in order.

        Raises ``DependencyUnavailable`` on any failure, at once when the concurrency
        cap is reached.
        """
        if not texts:
            return []
        if self._in_flight >= self.max_concurrency:
            REQUESTS.labels(SATURATED).inc()
            raise DependencyUnavailable(
                f"moderation service: {self.max_concurrency} events already being classified"
            )
        self._in_flight += 1
        slow_lane.waiting_outside()  # its batch answers the other events meanwhile
        tasks = [asyncio.ensure_future(self._request(text)) for text in texts]
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return [await task for task in tasks]
        except TimeoutError:
            REQUESTS.labels(TIMEOUT).inc()
            raise DependencyUnavailable(
                f"moderation service: no answer within {self.timeout_seconds:g}s"
            ) from None
        finally:
            self._in_flight -= 1
            for task in tasks:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the first failure is the one raised

    async def _addresses(self) -> list[str]:
        try:
            ipaddress.ip_address(self._host)
        except ValueError:
            pass
        else:
            return [self._host]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        except OSError as exc:
            REQUESTS.labels(CONNECTION_FAILED).inc()
            raise DependencyUnavailable(f"moderation service: cannot resolve host: {exc}") from None
        seen: list[str] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            if str(sockaddr[0]) not in seen:
                seen.append(str(sockaddr[0]))
        return seen

    async def _request(self, text: str) -> Moderation:
        start = time.perf_counter()
        try:
            return await self._send(text)
        finally:
            REQUEST_SECONDS.observe(time.perf_counter() - start)

    async def _send(self, text: str) -> Moderation:
        body = orjson.dumps({"model": self.model, "input": text})
        headers = {
            "Host": self._host_header,
            "Authorization": f"Bearer {self._api_key}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        failure = ""
        for ip in await self._addresses():
            try:
                self.guard.check(ip, destination=self._host)
            except DeniedDestination:
                logger.info("not connecting to the moderation service at %s: denied", ip)
                failure = failure or DENIED
                continue
            request = self._http.build_request(
                "POST",
                httpx.URL(
                    scheme=self._scheme,
                    host=ip,
                    port=self._port,
                    raw_path=self._target.encode("ascii"),
                ),
                headers=headers,
                content=body,
                extensions={"sni_hostname": self._host},
            )
            try:
                response = await self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                failure = CONNECTION_FAILED  # the next address may answer
                continue
            except httpx.TimeoutException:
                REQUESTS.labels(TIMEOUT).inc()
                raise DependencyUnavailable("moderation service: timed out") from None
            except httpx.HTTPError as exc:
                REQUESTS.labels(CONNECTION_FAILED).inc()
                raise DependencyUnavailable(f"moderation service: {type(exc).__name__}") from None
            try:
                return await self._answer(response)
            finally:
                await response.aclose()
        REQUESTS.labels(failure or CONNECTION_FAILED).inc()
        if failure == DENIED:
            raise DependencyUnavailable(
                "moderation service: every address refused by the network guard "
                "(see PS_OPENAI_FILTER_ALLOWED_NETWORKS)"
            )
        raise DependencyUnavailable("moderation service: cannot connect")

    async def _answer(self, response: httpx.Response) -> Moderation:
        status = response.status_code
        if not 200 <= status < 300:
            # Only the status: an error body may quote the key or the text.
            outcome = RATE_LIMITED if status == 429 else SERVER_ERROR if status >= 500 else REJECTED
            REQUESTS.labels(outcome).inc()
            raise DependencyUnavailable(f"moderation service: HTTP {status}")
        try:
            raw = await read_capped(response, MAX_RESPONSE_BYTES + 1)
        except httpx.HTTPError as exc:
            REQUESTS.labels(CONNECTION_FAILED).inc()
            raise DependencyUnavailable(f"moderation service: {type(exc).__name__}") from None
        result = _parse(raw) if len(raw) <= MAX_RESPONSE_BYTES else None
        if result is None:
            REQUESTS.labels(BAD_RESPONSE).inc()
            raise DependencyUnavailable("moderation service: not a moderation result")
        REQUESTS.labels(FLAGGED if result.flagged else NOT_FLAGGED).inc()
        return result


def _parse(raw: bytes) -> Moderation | None:
    """``results[0]`` of a moderation answer, or None when it is not one."""
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        return None
    flagged = results[0].get("flagged")
    categories = results[0].get("categories", {})
    if not isinstance(flagged, bool) or not isinstance(categories, dict):
        return None
    return Moderation(flagged, frozenset(k for k, v in categories.items() if v is True))

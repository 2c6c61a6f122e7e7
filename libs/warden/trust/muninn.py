"""The Muninn Hall trust source: servers in the Muninn Hall member directory.

Muninn Hall's bot publishes a member directory, ``{server name: [user IDs]}``; only the
server names matter (a user on a member server is trusted). Stored as policyserv stores
it, so ``warden import-policyserv`` carries it over: ``trust_data`` row
(``muninn_hall``, ``""``) with data ``{"server_names": [...]}``.

Two writers:

* ``MuninnPoller``: about hourly (50 to 70 minutes, random each time, as policyserv), one
  filter worker at a time, ``GET PS_MUNINN_HALL_SOURCE_API_URL`` with
  ``Authorization: Bearer PS_MUNINN_HALL_SOURCE_API_KEY``. The connection goes through
  the federation SSRF guard (``PS_HOMESERVER_ALLOWED/DENIED_NETWORKS``, checked on the
  IP actually connected to), https only, no redirects, a timeout and a size cap. A
  failed or slow poll changes nothing: the stored directory stays.
* the admin API's ``POST /api/v1/sources/muninn/set_member_directory_event`` (a Muninn
  bot event, ``content["com.muninn-hall.member_directory"]``).

Readers: each worker keeps the server set in memory (``MuninnDirectoryCache``),
reloaded from PostgreSQL at most every ``reload_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import ssl
import time
from typing import Any

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from warden import redis_keys
from warden.federation.errors import FederationError
from warden.federation.network_guard import GuardedTransport, NetworkGuard, send_to_targets
from warden.federation.xmatrix import is_valid_server_name
from warden.outbound_http import USER_AGENT, read_capped

logger = logging.getLogger(__name__)

SOURCE_NAME = "muninn_hall"
SOURCE_KEY = ""  # one directory per instance, not scoped to a room or community
EVENT_CONTENT_KEY = "com.muninn-hall.member_directory"

MAX_SERVERS = 50_000
"""Most servers kept from one directory (Muninn Hall has a few hundred members)."""
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
"""Largest directory answer read from the API."""

POLL_MIN_SECONDS = 50 * 60.0
POLL_MAX_SECONDS = 70 * 60.0
RETRY_AFTER_FAILURE_SECONDS = 5 * 60.0
CHECK_SECONDS = 60.0  # how often a worker without the lock looks whether a poll is due
DEFAULT_TIMEOUT_SECONDS = 30.0

MUNINN_POLLS = Counter(
    "warden_muninn_polls_total",
    "Muninn Hall member directory polls by this worker, by outcome (ok, failed).",
    ["outcome"],
)
MUNINN_DIRECTORY_UPDATES = Counter(
    "warden_muninn_directory_updates_total",
    "Muninn Hall member directories stored, by source (poll, admin_api).",
    ["source"],
)
MUNINN_SERVERS = Gauge(
    "warden_muninn_directory_servers",
    "Servers in the Muninn Hall member directory this worker holds in memory.",
)
MUNINN_RELOADS = Counter(
    "warden_muninn_directory_reloads_total",
    "Reloads of the in-memory Muninn Hall directory from PostgreSQL, by outcome "
    "(ok, failed: the previous copy stays in use).",
    ["outcome"],
)

_jitter = random.SystemRandom()


class InvalidDirectory(ValueError):
    """The member directory (or the event carrying it) is malformed; says why."""


def servers_from_directory(directory: object) -> list[str]:
    """The server names of a member directory ``{server: [user IDs]}``, sorted.

    Raises ``InvalidDirectory`` when it is not an object, a key is not a server name,
    or it holds more than ``MAX_SERVERS`` servers.
    """
    if not isinstance(directory, dict):
        raise InvalidDirectory("the member directory must be an object of server names")
    if len(directory) > MAX_SERVERS:
        raise InvalidDirectory(f"the member directory holds more than {MAX_SERVERS} servers")
    bad = next((s for s in directory if not is_valid_server_name(s)), None)
    if bad is not None:
        raise InvalidDirectory(f"not a server name: {bad[:100]!r}")
    return sorted(directory)


def servers_from_event(event: object) -> list[str]:
    """The server names of a Muninn bot event's ``content[EVENT_CONTENT_KEY]``."""
    content = event.get("content") if isinstance(event, dict) else None
    if not isinstance(content, dict) or EVENT_CONTENT_KEY not in content:
        raise InvalidDirectory(f"content.{EVENT_CONTENT_KEY} is missing")
    return servers_from_directory(content[EVENT_CONTENT_KEY])


def _servers_of_row(data: object) -> frozenset[str]:
    # policyserv's shape; an object keyed by server name is read too, in case a
    # directory was stored in its event shape.
    if isinstance(data, dict):
        names = data.get("server_names")
        if isinstance(names, list):
            return frozenset(s for s in names if isinstance(s, str))
        return frozenset(s for s in data if isinstance(s, str))
    return frozenset()


async def load_servers(pool: asyncpg.Pool) -> frozenset[str]:
    """The stored directory's server names (empty when none is stored)."""
    raw = await pool.fetchval(
        "SELECT data::text FROM trust_data WHERE source_name = $1 AND key = $2",
        SOURCE_NAME,
        SOURCE_KEY,
    )
    return _servers_of_row(orjson.loads(raw)) if raw is not None else frozenset()


async def store_servers(pool: asyncpg.Pool, servers: list[str], *, source: str) -> None:
    """Replace the stored directory."""
    await pool.execute(
        """
        INSERT INTO trust_data (source_name, key, data, updated_ts)
        VALUES ($1, $2, $3::jsonb, $4)
        ON CONFLICT (source_name, key)
        DO UPDATE SET data = EXCLUDED.data, updated_ts = EXCLUDED.updated_ts
        """,
        SOURCE_NAME,
        SOURCE_KEY,
        orjson.dumps({"server_names": servers}).decode(),
        int(time.time() * 1000),
    )
    MUNINN_DIRECTORY_UPDATES.labels(source).inc()


class MuninnDirectoryCache:
    """The directory's server names, in memory, reloaded at most every ``reload_seconds``.

    Loaded on first use (only media events of communities using the source ask). A
    reload that fails keeps the previous copy: it changes hourly at most. With no copy
    yet the failure propagates (the evaluation is judged again later).
    """

    def __init__(self, pool: asyncpg.Pool, *, reload_seconds: float = 60.0) -> None:
        self._pool = pool
        self._reload_seconds = reload_seconds
        self._servers: frozenset[str] | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Reload on next use."""
        self._expires = 0.0

    async def servers(self) -> frozenset[str]:
        """The member servers."""
        if self._servers is not None and time.monotonic() < self._expires:
            return self._servers
        async with self._lock:  # one reload at a time, others wait for its result
            if self._servers is not None and time.monotonic() < self._expires:
                return self._servers
            try:
                servers = await load_servers(self._pool)
            except Exception as exc:
                MUNINN_RELOADS.labels("failed").inc()
                if self._servers is None:
                    raise
                logger.warning(
                    "Muninn Hall directory reload failed; keeping the previous copy",
                    extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                self._expires = time.monotonic() + min(self._reload_seconds, 5.0)
                return self._servers
            MUNINN_RELOADS.labels("ok").inc()
            self._servers = servers
            self._expires = time.monotonic() + self._reload_seconds
            MUNINN_SERVERS.set(len(servers))
            return servers


class MuninnPoller:
    """Fetches the directory about hourly; one worker at a time across all of them.

    A worker polls when it can take the Redis lock ``redis_keys.muninn_poll_lock`` (SET
    NX); after a poll the lock is left to expire 50 to 70 minutes later (5 minutes after a
    failure), which is when the next poll is due, whoever takes it.
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        url: str,
        api_key: str,
        guard: NetworkGuard,
        ssl_context: ssl.SSLContext | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._url = url
        self._api_key = api_key
        self._guard = guard
        self._timeout = timeout_seconds
        self._check_seconds = check_seconds
        self._http = httpx.AsyncClient(
            transport=GuardedTransport(guard, ssl_context or ssl.create_default_context()),
            timeout=timeout_seconds,
            follow_redirects=False,
            trust_env=False,
        )
        self.polls = 0  # polls this worker made (tests, logs)

    @property
    def configured(self) -> bool:
        """Polling needs both the URL and the key (as policyserv)."""
        return bool(self._url and self._api_key)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll whenever due and the lock can be had, until ``stopping`` is set."""
        if not self.configured:
            logger.info("Muninn Hall polling off: no API URL or key")
            return
        delay = _jitter.uniform(0, 10)  # soon after start, not all workers at once
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return
            try:
                await self.poll_if_due()
            except Exception:  # Redis or PostgreSQL hiccup: try again later
                logger.exception("Muninn Hall poll failed", extra={"event": "muninn_poll_failed"})
            delay = self._check_seconds * _jitter.uniform(0.9, 1.1)

    async def poll_if_due(self) -> bool:
        """Take the lock and poll once; False when another worker holds it (or polled
        less than an interval ago)."""
        key = redis_keys.muninn_poll_lock()
        token = secrets.token_hex(8)
        lease_ms = int((self._timeout + 60) * 1000)
        if not await self._redis.set(key, token, nx=True, px=lease_ms):
            return False
        ok = False
        try:
            ok = await self.poll_once()
        finally:
            hold = _jitter.uniform(POLL_MIN_SECONDS, POLL_MAX_SECONDS)
            if not ok:
                hold = RETRY_AFTER_FAILURE_SECONDS
            await self._redis.set(key, token, px=int(hold * 1000))
            self.polls += 1
        return True

    async def poll_once(self) -> bool:
        """Fetch and store the directory; False (nothing changed) on any failure."""
        try:
            async with asyncio.timeout(self._timeout):
                servers = servers_from_directory(await self._fetch())
        except (TimeoutError, FederationError, InvalidDirectory, httpx.HTTPError, OSError) as exc:
            MUNINN_POLLS.labels("failed").inc()
            reason = f"timed out after {self._timeout}s" if isinstance(exc, TimeoutError) else exc
            logger.warning(
                "Muninn Hall directory not fetched; the stored one stays",
                extra={"event": "muninn_poll", "error": f"{reason}"[:300]},
            )
            return False
        await store_servers(self._pool, servers, source="poll")
        MUNINN_POLLS.labels("ok").inc()
        logger.info("Muninn Hall directory stored", extra={"servers": len(servers)})
        return True

    async def _fetch(self) -> object:
        parsed = httpx.URL(self._url)
        if parsed.scheme != "https" or not parsed.host:
            raise InvalidDirectory("PS_MUNINN_HALL_SOURCE_API_URL must be an https URL")
        host = parsed.host
        port = parsed.port or 443
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((str(i[4][0]), port) for i in infos))
        shown = f"[{host}]" if ":" in host else host
        response = await send_to_targets(
            self._http,
            self._guard,
            destination=host,
            method="GET",
            targets=addresses,
            host_header=shown if port == 443 else f"{shown}:{port}",
            tls_server_name=host,
            target=parsed.raw_path.decode("ascii") or "/",
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
        )
        try:
            if response.status_code != 200:
                raise InvalidDirectory(f"HTTP {response.status_code}")
            body = await read_capped(response, MAX_RESPONSE_BYTES + 1)
        finally:
            await response.aclose()
        if len(body) > MAX_RESPONSE_BYTES:
            raise InvalidDirectory(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            data: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidDirectory("answer is not JSON") from None
        return data

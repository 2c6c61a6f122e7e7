"""Fixtures for HMA media scanning: a real HMA service and media repository on loopback."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.local_servers import ThreadedServer, start_threaded, stop_all
from warden.dev.hma_fakes import HmaService, MediaRepository
from warden.federation.network_guard import NetworkGuard
from warden.media_scan.download import MediaDownloader
from warden.media_scan.hma import HmaClient
from warden.media_scan.scanner import MediaScanner

# Loopback is where the test servers are: allowed for the tests that are not about SSRF.
LOOPBACK_GUARD = NetworkGuard(["127.0.0.0/8"], [])


@dataclass
class Services:
    """The running services and their state."""

    media: MediaRepository
    media_server: ThreadedServer
    hma: HmaService
    hma_server: ThreadedServer
    other_media: MediaRepository  # where "away-" redirects point
    other_server: ThreadedServer


@pytest.fixture
async def services() -> AsyncIterator[Services]:
    """The HMA service, the homeserver's media repository and another host."""
    media, hma, other = MediaRepository(), HmaService(), MediaRepository()
    media_server = await start_threaded(media.app())
    hma_server = await start_threaded(hma.app())
    other_server = await start_threaded(other.app())
    media.redirect_target = (
        f"{other_server.base_url}/_matrix/client/v1/media/download/example.org/img-x"
    )
    try:
        yield Services(media, media_server, hma, hma_server, other, other_server)
    finally:
        media.release_slow.set()
        stop_all([media_server, hma_server, other_server])


ScannerFactory = Callable[..., MediaScanner]


@pytest.fixture
async def make_scanner(services: Services, pg_pool: asyncpg.Pool) -> AsyncIterator[ScannerFactory]:
    """Builds scanners (one per simulated worker), each with its own Redis client."""
    made: list[MediaScanner] = []
    clients: list[aioredis.Redis] = []

    def build(
        *,
        redis: aioredis.Redis | None = None,
        guard: NetworkGuard = LOOPBACK_GUARD,
        media_url: str | None = None,
        max_bytes: int = 1024 * 1024,
        timeout_seconds: float = 10.0,
        hma_key: str = "hma-key",
        failure_cache_seconds: float = 0.0,
    ) -> MediaScanner:
        from tests.conftest import REDIS_URL

        if redis is None:
            redis = aioredis.from_url(REDIS_URL)
            clients.append(redis)
        downloader = MediaDownloader(
            media_url or services.media_server.base_url,
            services.media.access_token,
            guard,
            max_bytes=max_bytes,
            timeout_seconds=timeout_seconds,
        )
        hma = HmaClient(services.hma_server.base_url, hma_key, timeout_seconds=timeout_seconds)
        scanner = MediaScanner(
            pg_pool,
            redis,
            downloader,
            hma,
            timeout_seconds=timeout_seconds,
            failure_cache_seconds=failure_cache_seconds,
            poll_seconds=0.02,
        )
        made.append(scanner)
        return scanner

    yield build
    for scanner in made:
        await scanner.aclose()
    for client in clients:
        await client.aclose()


@pytest.fixture
def new_community(pg_pool: asyncpg.Pool) -> Callable[[], Awaitable[str]]:
    """Creates a community row (media classifications reference it); returns its ID."""

    async def create() -> str:
        community_id = f"c-{uuid.uuid4().hex[:10]}"
        await pg_pool.execute("INSERT INTO communities (id, name) VALUES ($1, $1)", community_id)
        return community_id

    return create


def tag() -> str:
    """A fresh media tag: the caches are shared by the whole test session."""
    return uuid.uuid4().hex[:12]

"""Polling the Muninn Hall member directory from a real local HTTPS server: a good
answer is stored, failures and slow answers change nothing, the SSRF guard applies, and
of two workers only one polls."""

from __future__ import annotations

import asyncio
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
import trustme

from tests.local_servers import ThreadedServer, start_threaded, stop_all
from warden import redis_keys
from warden.federation.network_guard import NetworkGuard
from warden.settings import DEFAULT_DENIED_NETWORKS
from warden.trust import muninn

LOOPBACK = {"127.0.0.0/8", "::1/128"}
DENIED_EXCEPT_LOOPBACK = [n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in LOOPBACK]
API_KEY = "muninn-test-key"


@dataclass
class MuninnApi:
    """The directory API: answers ``body`` with ``status`` after ``delay`` seconds."""

    body: bytes = b"{}"
    status: int = 200
    delay: float = 0.0
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        with self.lock:
            self.requests.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        if self.delay:
            await asyncio.sleep(self.delay)
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def serve(ca: trustme.CA, tmp_path: Path) -> Iterator[Callable[[Any], Awaitable[ThreadedServer]]]:
    started: list[ThreadedServer] = []

    async def start(app: Any) -> ThreadedServer:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = tmp_path / f"s{len(started)}.pem", tmp_path / f"s{len(started)}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        server = await start_threaded(app, certfile=str(cert), keyfile=str(key))
        started.append(server)
        return server

    yield start
    stop_all(started)


@pytest.fixture
async def clean_directory(pg_pool: asyncpg.Pool) -> AsyncIterator[None]:
    await pg_pool.execute("DELETE FROM trust_data WHERE source_name = $1", muninn.SOURCE_NAME)
    yield
    await pg_pool.execute("DELETE FROM trust_data WHERE source_name = $1", muninn.SOURCE_NAME)


def make_poller(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    ca: trustme.CA,
    url: str,
    *,
    guard: NetworkGuard | None = None,
    timeout: float = 5.0,
) -> muninn.MuninnPoller:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return muninn.MuninnPoller(
        pool=pool,
        redis=redis,
        url=url,
        api_key=API_KEY,
        guard=guard or NetworkGuard(["0.0.0.0/0", "::/0"], DENIED_EXCEPT_LOOPBACK),
        ssl_context=context,
        timeout_seconds=timeout,
    )


def directory(*servers: str) -> bytes:
    return orjson.dumps({s: [f"@admin:{s}"] for s in servers})


async def test_a_good_answer_is_stored_and_read_by_workers(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    ca: trustme.CA,
    serve: Callable[[Any], Awaitable[ThreadedServer]],
    clean_directory: None,
) -> None:
    api = MuninnApi(body=directory("one.example", "two.example:8448"))
    server = await serve(api)
    poller = make_poller(pg_pool, redis_client, ca, server.url("/member_directory"))
    try:
        assert await poller.poll_if_due()
    finally:
        await poller.aclose()
    assert api.requests[0]["authorization"] == f"Bearer {API_KEY}"
    assert await muninn.load_servers(pg_pool) == {"one.example", "two.example:8448"}
    # policyserv's stored shape, so either can read the other's.
    raw = await pg_pool.fetchval(
        "SELECT data::text FROM trust_data WHERE source_name = $1", "muninn_hall"
    )
    assert orjson.loads(raw) == {"server_names": ["one.example", "two.example:8448"]}
    cache = muninn.MuninnDirectoryCache(pg_pool)
    assert await cache.servers() == {"one.example", "two.example:8448"}
    # The next poll is due in about an hour: the lock is held that long.
    ttl = await redis_client.pttl(redis_keys.muninn_poll_lock())
    assert muninn.POLL_MIN_SECONDS * 1000 - 5000 <= ttl <= muninn.POLL_MAX_SECONDS * 1000


@pytest.mark.parametrize(
    "api",
    [
        MuninnApi(status=500, body=b'{"errcode":"M_UNKNOWN"}'),
        MuninnApi(status=401, body=b'{"errcode":"M_UNKNOWN_TOKEN"}'),
        MuninnApi(body=b"not json"),
        MuninnApi(body=b'["a.example"]'),
        MuninnApi(body=orjson.dumps({"bad server name!": []})),
    ],
    ids=["5xx", "401", "not-json", "not-an-object", "bad-server-name"],
)
async def test_a_failed_poll_keeps_the_stored_directory(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    ca: trustme.CA,
    serve: Callable[[Any], Awaitable[ThreadedServer]],
    clean_directory: None,
    api: MuninnApi,
) -> None:
    await muninn.store_servers(pg_pool, ["kept.example"], source="test")
    server = await serve(api)
    poller = make_poller(pg_pool, redis_client, ca, server.url("/member_directory"))
    try:
        assert not await poller.poll_once()
    finally:
        await poller.aclose()
    assert len(api.requests) == 1
    assert await muninn.load_servers(pg_pool) == {"kept.example"}


async def test_a_slow_answer_times_out_and_is_tried_again_sooner(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    ca: trustme.CA,
    serve: Callable[[Any], Awaitable[ThreadedServer]],
    clean_directory: None,
) -> None:
    await muninn.store_servers(pg_pool, ["kept.example"], source="test")
    api = MuninnApi(body=directory("late.example"), delay=3.0)
    server = await serve(api)
    poller = make_poller(pg_pool, redis_client, ca, server.url("/d"), timeout=0.3)
    try:
        assert await poller.poll_if_due()  # it polled (and failed)
    finally:
        await poller.aclose()
    assert await muninn.load_servers(pg_pool) == {"kept.example"}
    ttl = await redis_client.pttl(redis_keys.muninn_poll_lock())
    assert 0 < ttl <= muninn.RETRY_AFTER_FAILURE_SECONDS * 1000


async def test_the_ssrf_guard_refuses_a_private_address(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    ca: trustme.CA,
    serve: Callable[[Any], Awaitable[ThreadedServer]],
    clean_directory: None,
) -> None:
    api = MuninnApi(body=directory("one.example"))
    server = await serve(api)
    default_guard = NetworkGuard(["0.0.0.0/0", "::/0"], DEFAULT_DENIED_NETWORKS.split(","))
    # localhost resolves to loopback, which the default deny list holds.
    poller = make_poller(pg_pool, redis_client, ca, server.url("/d"), guard=default_guard)
    try:
        assert not await poller.poll_once()
    finally:
        await poller.aclose()
    assert api.requests == []
    assert await muninn.load_servers(pg_pool) == frozenset()


async def test_plain_http_is_refused(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, ca: trustme.CA, clean_directory: None
) -> None:
    poller = make_poller(pg_pool, redis_client, ca, "http://127.0.0.1:9/member_directory")
    try:
        assert not await poller.poll_once()
    finally:
        await poller.aclose()


async def test_of_two_workers_only_one_polls(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    ca: trustme.CA,
    serve: Callable[[Any], Awaitable[ThreadedServer]],
    clean_directory: None,
) -> None:
    api = MuninnApi(body=directory(f"{uuid.uuid4().hex}.example"), delay=0.2)
    server = await serve(api)
    url = server.url("/member_directory")
    first = make_poller(pg_pool, redis_client, ca, url)
    second = make_poller(pg_pool, redis_client, ca, url)
    try:
        polled = await asyncio.gather(first.poll_if_due(), second.poll_if_due())
        assert sorted(polled) == [False, True]
        # And neither polls again before the interval is over.
        assert await asyncio.gather(first.poll_if_due(), second.poll_if_due()) == [False, False]
    finally:
        await first.aclose()
        await second.aclose()
    assert len(api.requests) == 1
    assert first.polls + second.polls == 1


async def test_the_run_loop_polls_only_when_configured(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, ca: trustme.CA
) -> None:
    poller = muninn.MuninnPoller(
        pool=pg_pool,
        redis=redis_client,
        url="https://muninn.invalid/x",
        api_key="",
        guard=NetworkGuard(["0.0.0.0/0"], []),
    )
    try:
        assert not poller.configured
        await asyncio.wait_for(poller.run(asyncio.Event()), 5)  # returns at once
    finally:
        await poller.aclose()
    assert poller.polls == 0
    assert await redis_client.exists(redis_keys.muninn_poll_lock()) == 0


async def test_the_in_memory_copy_is_reloaded_and_survives_a_failed_reload(
    pg_pool: asyncpg.Pool, pg_database: str, clean_directory: None
) -> None:
    await muninn.store_servers(pg_pool, ["a.example"], source="test")
    cache = muninn.MuninnDirectoryCache(pg_pool, reload_seconds=3600)
    assert await cache.servers() == {"a.example"}
    await muninn.store_servers(pg_pool, ["b.example"], source="test")
    assert await cache.servers() == {"a.example"}  # within the reload interval
    cache.invalidate()
    assert await cache.servers() == {"b.example"}
    # A reload against a closed pool fails: the previous copy stays in use.
    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=1)
    broken = muninn.MuninnDirectoryCache(pool, reload_seconds=0)
    assert await broken.servers() == {"b.example"}
    await pool.close()
    assert await broken.servers() == {"b.example"}


def test_muninn_settings_are_policyservs(monkeypatch: pytest.MonkeyPatch) -> None:
    from warden.policy.config import instance_defaults
    from warden.policyserv_settings import ignored_settings_in
    from warden.settings import Settings

    assert Settings().muninn_hall_source_api_url == (
        "https://mau.bot/_matrix/maubot/plugin/muninnbot/member_directory"
    )
    # Empty is policyserv's way to turn polling off, not "unset".
    monkeypatch.setenv("PS_MUNINN_HALL_SOURCE_API_URL", "")
    monkeypatch.setenv("PS_MUNINN_HALL_SOURCE_API_KEY", "secret")
    settings = Settings()
    assert settings.muninn_hall_source_api_url == ""
    assert "secret" not in repr(settings)
    env = {
        "PS_MUNINN_HALL_SOURCE_API_KEY": "k",
        "PS_UNTRUSTED_MEDIA_FILTER_USE_MUNINN": "false",
        "PS_UNTRUSTED_MEDIA_FILTER_ALLOWED_USER_GLOBS": "@*:example.org",
    }
    # Read now, so no longer warned about as ignored.
    assert ignored_settings_in(env) == []
    defaults = instance_defaults(env)
    assert defaults["untrusted_media_filter_use_muninn"] is False
    assert defaults["untrusted_media_filter_allowed_user_globs"] == ["@*:example.org"]

"""Fixtures for the policy API tests: origins with real HTTPS key servers, a stand-in
filter worker on real NATS, and gateway apps wired to the test PostgreSQL and Redis.

Every in-process gateway asks its own NATS subject (``EVALUATE_SUBJECT`` plus a random
suffix), so that stand-in workers of concurrently running tests, or a real worker
somewhere on the same NATS server, never answer for each other. The spawned-gateway
test in ``test_sign_request_command.py`` uses the real ``EVALUATE_SUBJECT``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from signedjson.key import generate_signing_key, get_verify_key

# The federation tests' HTTPS fixtures (test CA, servers on loopback).
from tests.federation.conftest import https_server, tls_ca, tls_ca_file  # noqa: F401
from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    Decide,
    Gateway,
    GatewayFactory,
    Origin,
    StandInWorker,
    allow,
)
from warden.bus.subjects import CONFIG_CHANGED_SUBJECT, EVALUATE_SUBJECT
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.matrix.keys import key_id_of
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.settings import DEFAULT_DENIED_NETWORKS, Settings
from warden.storage.rooms import put_room
from warden.telemetry.tracing import configure_tracing
from warden_gateway.app import build_app
from warden_gateway.event_checks import CheckedEvents
from warden_gateway.moderation_requests import ModerationRequests
from warden_gateway.policy_api import PolicyAPI
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.room_cache import RoomCache
from warden_gateway.verdict_source import VerdictSource

DENIED_WITHOUT_LOOPBACK = [
    n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}
]


@pytest.fixture
def identity() -> Identity:
    """The gateway's keys (fresh per test)."""
    fed = generate_signing_key("a_fed")
    return Identity(GATEWAY_NAME, fed, key_id_of(fed), generate_signing_key("a_pol"))


@pytest.fixture
def evaluate_subject() -> str:
    """A NATS subject private to this test (see the module docstring)."""
    return f"{EVALUATE_SUBJECT}.test{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_gateway(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,  # noqa: F811
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    identity: Identity,
    evaluate_subject: str,
) -> AsyncIterator[GatewayFactory]:
    """Build gateway apps sharing this test's PostgreSQL, Redis, NATS and identity.

    Keyword arguments override settings; ``rate_clock`` fixes the rate limiter's clock;
    ``room_pool`` replaces the pool rooms are read from; ``moderation`` publishes
    moderation requests.
    """
    # As bootstrap() does in a service: without a tracer provider spans carry no context.
    configure_tracing("gateway")
    closers: list[Callable[[], Awaitable[None]]] = []

    async def build(
        rate_clock: Callable[[], float] | None = None,
        room_pool: asyncpg.Pool | None = None,
        moderation: ModerationRequests | None = None,
        **overrides: Any,
    ) -> Gateway:
        values: dict[str, Any] = {
            "homeserver_denied_networks": DENIED_WITHOUT_LOOPBACK,
            "federation_ca_file": tls_ca_file,
            "direct_key_fetching": True,
            "key_query_server": "",
            "key_fetch_timeout_seconds": 5.0,
            "verdict_timeout_seconds": 5.0,
        }
        values.update(overrides)
        settings = make_settings(**values)
        federation = FederationClient(settings, identity.federation_key)
        closers.append(federation.aclose)
        keyring = Keyring(
            settings,
            federation,
            redis_client,
            pg_pool,
            our_server_name=GATEWAY_NAME,
            our_keys={identity.federation_key_id: get_verify_key(identity.federation_key)},
        )
        rooms = RoomCache(room_pool or pg_pool)
        sub = await nats_client.subscribe(CONFIG_CHANGED_SUBJECT, cb=rooms.on_config_changed)
        closers.append(sub.unsubscribe)
        verdicts = VerdictSource(
            nats_client,
            timeout_seconds=settings.verdict_timeout_seconds,
            subject=evaluate_subject,
        )
        limiter_kwargs = {"clock": rate_clock} if rate_clock is not None else {}
        rate_limiter = OriginRateLimiter(
            redis_client,
            settings.sign_rate_limit_per_origin,
            settings.sign_rate_limit_window_seconds,
            **limiter_kwargs,
        )
        closers.append(rate_limiter.aclose)
        policy = PolicyAPI(
            identity=identity,
            keyring=keyring,
            rooms=rooms,
            verdicts=verdicts,
            rate_limiter=rate_limiter,
            max_body_bytes=settings.max_pdu_bytes,
            checked_events=CheckedEvents(max_bytes=settings.event_check_cache_max_bytes),
            moderation=moderation,
        )
        app = build_app(identity, Health("gateway"), settings=settings, policy=policy)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
        )
        closers.append(client.aclose)
        return Gateway(
            app, client, identity, settings, verdicts, rooms, evaluate_subject, rate_limiter
        )

    try:
        yield build
    finally:
        for close in reversed(closers):
            await close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    """A gateway with default policy settings."""
    return await make_gateway()


@pytest.fixture
async def start_origin(https_server: Any) -> Callable[[], Awaitable[Origin]]:  # noqa: F811
    """Start origin homeservers, each with its key server on 127.0.0.1."""

    async def start() -> Origin:
        origin = Origin()
        local = await https_server(origin.key_server_app(), host="127.0.0.1", names=["127.0.0.1"])
        origin.name = local.address
        return origin

    return start


@pytest.fixture
async def origin(start_origin: Callable[[], Awaitable[Origin]]) -> Origin:
    """One origin homeserver."""
    return await start_origin()


@pytest.fixture
async def start_worker(
    nats_client: NATS, evaluate_subject: str, redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., Awaitable[StandInWorker]]]:
    """Start stand-in filter workers on this test's subject (stopped after the test)."""
    workers: list[StandInWorker] = []

    async def start(decide: Decide = allow, **kwargs: Any) -> StandInWorker:
        kwargs.setdefault("redis", redis_client)
        worker = StandInWorker(nats_client, evaluate_subject, decide, **kwargs)
        workers.append(worker)
        return await worker.start()

    try:
        yield start
    finally:
        for worker in workers:
            await worker.stop()


@pytest.fixture
async def protect_room(pg_pool: asyncpg.Pool) -> Callable[..., Awaitable[str]]:
    """Put a room under protection: ``await protect_room(room_id, version)``."""

    async def protect(room_id: str, room_version: str, community_id: str = "default") -> str:
        await put_room(pg_pool, room_id, room_version, community_id)
        return room_id

    return protect

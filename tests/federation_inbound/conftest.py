"""Fixtures for the receiving side of federation: an in-process gateway serving ``/send``
(publishing to a JetStream subject private to the test), origins with real HTTPS key
servers, and a reader of what was published."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from signedjson.key import get_verify_key

# Shared fixtures: the test CA and HTTPS servers, origins, the gateway's identity.
from tests.federation.conftest import https_server, tls_ca, tls_ca_file  # noqa: F401
from tests.gateway.conftest import identity, origin, protect_room, start_origin  # noqa: F401
from tests.gateway.policy_harness import GATEWAY_NAME, Origin
from warden.bus.streams import ensure_inbound_stream
from warden.bus.subjects import INBOUND_PDU_SUBJECT, INBOUND_STREAM
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.federation.xmatrix import sign_request
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.settings import DEFAULT_DENIED_NETWORKS, Settings
from warden_gateway.app import build_app
from warden_gateway.federation_inbound import FederationInbound
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.room_cache import RoomCache

DENIED_WITHOUT_LOOPBACK = [
    n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}
]
LOCAL_USER = f"@policyserv:{GATEWAY_NAME}"


def origin_settings(make_settings: Callable[..., Settings], ca_file: str, **kw: Any) -> Settings:
    """Settings that let a keyring fetch keys from loopback origins signed by the test CA."""
    values: dict[str, Any] = {
        "homeserver_denied_networks": DENIED_WITHOUT_LOOPBACK,
        "federation_ca_file": ca_file,
        "direct_key_fetching": True,
        "key_query_server": "",
        "key_fetch_timeout_seconds": 5.0,
    }
    values.update(kw)
    return make_settings(**values)


@dataclass
class Published:
    """Reads what the gateway published on the test's inbound subject."""

    js: Any
    subject: str
    durable: str
    stream: str = INBOUND_STREAM

    async def fetch(self, expect: int, timeout: float = 3.0) -> list[Any]:
        """Up to ``expect`` messages (fewer if no more arrive within ``timeout``)."""
        sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        got: list[Any] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while len(got) < expect and loop.time() < deadline:
                try:
                    msgs = await sub.fetch(batch=expect - len(got), timeout=0.5)
                except TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got.extend(msgs)
        finally:
            await sub.unsubscribe()
        return got


@dataclass
class InboundGateway:
    """An in-process gateway with ``/send`` and what a test needs around it."""

    client: httpx.AsyncClient
    identity: Identity
    subject: str
    published: Published

    async def send(
        self,
        sender: Origin,
        txn_id: str,
        body: Any,
        *,
        sign_as: Any = None,
        raw: bytes | None = None,
    ) -> httpx.Response:
        """PUT a transaction signed by ``sender`` (``sign_as`` overrides the signed body)."""
        uri = f"/_matrix/federation/v1/send/{txn_id}"
        signed = body if sign_as is None else sign_as
        auth = sign_request(sender.name, GATEWAY_NAME, "PUT", uri, signed, sender.key)

        content = raw if raw is not None else orjson.dumps(body)
        return await self.client.put(
            uri,
            content=content,
            headers={"Authorization": auth, "Content-Type": "application/json"},
        )


InboundFactory = Callable[..., Awaitable[InboundGateway]]


@pytest.fixture
async def make_inbound_gateway(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,  # noqa: F811
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    identity: Identity,  # noqa: F811
) -> AsyncIterator[InboundFactory]:
    """Build gateways publishing inbound PDUs to ``warden.inbound.pdu.test<random>``
    (inside the real stream, outside the real consumer's filter), read by a test durable.

    Keywords: ``send_limit`` (and ``rate_clock``) give the gateway a ``/send`` budget;
    ``room_pool`` replaces the pool rooms are read from; ``stream`` and ``subject``
    publish into another stream (which the test created); ``max_pdu_bytes``; ``redis``
    replaces the Redis of the transaction deduplication.
    """
    settings = origin_settings(make_settings, tls_ca_file)
    federation = FederationClient(settings, identity.federation_key)
    keyring = Keyring(
        settings,
        federation,
        redis_client,
        pg_pool,
        our_server_name=GATEWAY_NAME,
        our_keys={identity.federation_key_id: get_verify_key(identity.federation_key)},
    )
    js = nats_client.jetstream()
    await ensure_inbound_stream(js)
    closers: list[Callable[[], Awaitable[Any]]] = []

    async def build(
        *,
        send_limit: int = 0,
        rate_clock: Callable[[], float] | None = None,
        room_pool: asyncpg.Pool | None = None,
        stream: str = INBOUND_STREAM,
        subject: str | None = None,
        max_pdu_bytes: int = 65536,
        redis: aioredis.Redis | None = None,
    ) -> InboundGateway:
        suffix = uuid.uuid4().hex[:12]
        subject = subject or f"{INBOUND_PDU_SUBJECT}.test{suffix}"
        durable = f"test-inbound-{suffix}"
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=subject,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                # A message delivered to a pull request that timed out on the client
                # side is redelivered only after this: keep it short so a slow
                # machine's late delivery is read by the next fetch.
                ack_wait=2,
            ),
        )

        async def delete_consumer() -> None:
            with contextlib.suppress(NotFoundError):  # the test may have removed its stream
                await js.delete_consumer(stream, durable)

        closers.append(delete_consumer)
        limiter = None
        if send_limit:
            limiter = OriginRateLimiter(
                redis_client,
                send_limit,
                60,
                budget="send",
                what="/send PDUs and transactions",
                **({"clock": rate_clock} if rate_clock is not None else {}),
            )
            closers.append(limiter.aclose)
        inbound = FederationInbound(
            server_name=GATEWAY_NAME,
            local_user_id=LOCAL_USER,
            keyring=keyring,
            rooms=RoomCache(room_pool or pg_pool),
            redis=redis_client if redis is None else redis,
            js=js,
            subject=subject,
            max_pdu_bytes=max_pdu_bytes,
            rate_limiter=limiter,
        )
        app = build_app(identity, Health("gateway"), settings=settings, federation=inbound)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
        )
        closers.append(client.aclose)
        return InboundGateway(client, identity, subject, Published(js, subject, durable, stream))

    try:
        yield build
    finally:
        for close in reversed(closers):
            await close()
        await federation.aclose()


@pytest.fixture
async def inbound_gateway(make_inbound_gateway: InboundFactory) -> InboundGateway:
    """A gateway with default settings (no /send budget)."""
    return await make_inbound_gateway()


@pytest.fixture
def txn_id() -> Callable[[], str]:
    """Fresh transaction IDs."""
    return lambda: "txn" + uuid.uuid4().hex


ProtectRoom = Callable[..., Awaitable[str]]

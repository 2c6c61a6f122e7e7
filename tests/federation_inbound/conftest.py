"""Fixtures for the receiving side of federation: an in-process gateway serving ``/send``
(publishing to a JetStream subject private to the test), origins with real HTTPS key
servers, and a reader of what was published."""

from __future__ import annotations

import asyncio
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

    async def fetch(self, expect: int, timeout: float = 3.0) -> list[Any]:
        """Up to ``expect`` messages (fewer if no more arrive within ``timeout``)."""
        sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=INBOUND_STREAM)
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


@pytest.fixture
async def inbound_gateway(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,  # noqa: F811
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    identity: Identity,  # noqa: F811
) -> AsyncIterator[InboundGateway]:
    """A gateway publishing inbound PDUs to ``warden.inbound.pdu.test<random>`` (inside
    the real stream, outside the real consumer's filter), read by a test durable."""
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
    suffix = uuid.uuid4().hex[:12]
    subject = f"{INBOUND_PDU_SUBJECT}.test{suffix}"
    durable = f"test-inbound-{suffix}"
    await js.add_consumer(
        INBOUND_STREAM,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    inbound = FederationInbound(
        server_name=GATEWAY_NAME,
        local_user_id=LOCAL_USER,
        keyring=keyring,
        rooms=RoomCache(pg_pool),
        redis=redis_client,
        js=js,
        subject=subject,
    )
    app = build_app(identity, Health("gateway"), settings=settings, federation=inbound)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30
    )
    try:
        yield InboundGateway(client, identity, subject, Published(js, subject, durable))
    finally:
        await client.aclose()
        await federation.aclose()
        await js.delete_consumer(INBOUND_STREAM, durable)


@pytest.fixture
def txn_id() -> Callable[[], str]:
    """Fresh transaction IDs."""
    return lambda: "txn" + uuid.uuid4().hex


ProtectRoom = Callable[..., Awaitable[str]]

"""Fixtures for the room-state consumer and refresh tests: HTTPS origins (from the
federation and gateway test fixtures) and a keyring that trusts them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import redis.asyncio as aioredis
from signedjson.key import generate_signing_key, get_verify_key

from tests.federation.conftest import https_server, tls_ca, tls_ca_file  # noqa: F401
from tests.federation_inbound.conftest import origin_settings
from tests.gateway.policy_harness import GATEWAY_NAME
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.matrix.keys import key_id_of
from warden.runtime.identity import Identity
from warden.settings import Settings


@pytest.fixture
def warden_identity() -> Identity:
    """Warden's keys for these tests."""
    fed = generate_signing_key("w_fed")
    return Identity(GATEWAY_NAME, fed, key_id_of(fed), generate_signing_key("w_pol"))


@pytest.fixture
async def federation(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,  # noqa: F811
    warden_identity: Identity,
) -> AsyncIterator[FederationClient]:
    """A federation client that may reach loopback origins signed by the test CA."""
    client = FederationClient(
        origin_settings(make_settings, tls_ca_file), warden_identity.federation_key
    )
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def keyring(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,  # noqa: F811
    federation: FederationClient,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    warden_identity: Identity,
) -> Keyring:
    """A keyring fetching keys directly from origins."""
    return Keyring(
        origin_settings(make_settings, tls_ca_file),
        federation,
        redis_client,
        pg_pool,
        our_server_name=GATEWAY_NAME,
        our_keys={
            warden_identity.federation_key_id: get_verify_key(warden_identity.federation_key)
        },
    )

"""Fixtures for the membership tests: a resident homeserver on HTTPS and gateway
processes configured to reach it (loopback allowed, the test CA trusted, keys fetched
directly from origins)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from signedjson.key import get_verify_key

from tests.federation.conftest import https_server, tls_ca, tls_ca_file  # noqa: F401
from tests.membership.remote_homeserver import RemoteHomeserver
from tests.service_processes import ServiceProcess
from warden.matrix.keys import key_id_of, load_signing_key
from warden.settings import DEFAULT_DENIED_NETWORKS

API_KEY = "membership-test-key"
GATEWAY_NAME = "warden.test"
WARDEN_USER = f"@policyserv:{GATEWAY_NAME}"


@pytest.fixture
async def remote(
    https_server: Any,  # noqa: F811
    key_paths: tuple[Path, Path],
) -> RemoteHomeserver:
    """A resident homeserver that knows the gateway's federation key."""
    homeserver = RemoteHomeserver()
    local = await https_server(homeserver.app(), host="127.0.0.1", names=["127.0.0.1"])
    homeserver.name = local.address
    federation_key = load_signing_key(key_paths[0])
    homeserver.trust(GATEWAY_NAME, key_id_of(federation_key), get_verify_key(federation_key))
    return homeserver


@pytest.fixture
def gateway_env(tls_ca_file: str) -> dict[str, str]:  # noqa: F811
    """Environment for gateways that talk to the local remote."""
    denied = [n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}]
    return {
        "PS_API_KEY": API_KEY,
        "PS_HOMESERVER_DENIED_NETWORKS": ",".join(denied),
        "PS_FEDERATION_CA_FILE": tls_ca_file,
        "PS_DIRECT_KEY_FETCHING": "true",
        "PS_KEY_QUERY_SERVER": "",
        "PS_FEDERATION_TIMEOUT_SECONDS": "10",
        "PS_VERDICT_TIMEOUT_SECONDS": "1",
        "PS_JOIN_RETRY_BASE_SECONDS": "0.2",
    }


@pytest.fixture
def start_gateway(
    spawn_service: Callable[..., ServiceProcess], gateway_env: dict[str, str]
) -> Callable[..., ServiceProcess]:
    """Start a ready gateway process; keyword arguments add environment variables."""

    def start(**env: str) -> ServiceProcess:
        gateway = spawn_service("gateway", **{**gateway_env, **env})
        gateway.wait_ready()
        return gateway

    return start


@pytest.fixture
async def admin_client() -> AsyncIterator[Callable[[ServiceProcess], httpx.AsyncClient]]:
    """``admin_client(gateway)``: an HTTP client on the gateway with the admin API key."""
    clients: list[httpx.AsyncClient] = []

    def make(gateway: ServiceProcess) -> httpx.AsyncClient:
        assert gateway.api_url is not None
        client = httpx.AsyncClient(
            base_url=gateway.api_url,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()

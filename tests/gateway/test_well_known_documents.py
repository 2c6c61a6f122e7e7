"""``/.well-known/matrix/{policy_server, org.matrix.msc4284.policy_server, server, support}``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from signedjson.key import generate_signing_key

from warden.matrix.ids import ServerName
from warden.matrix.keys import key_id_of, verify_key_base64
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.settings import Settings, load_settings
from warden_gateway.app import build_app

CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, OPTIONS",
    "access-control-allow-headers": "X-Requested-With, Content-Type, Authorization",
}


@pytest.fixture
def identity() -> Identity:
    fed = generate_signing_key("a_fed")
    return Identity(ServerName("policy.example"), fed, key_id_of(fed), generate_signing_key("p"))


@pytest.fixture
async def client_for(
    identity: Identity,
) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(**settings: Any) -> httpx.AsyncClient:
        app = build_app(
            identity,
            Health("gateway"),
            settings=Settings(homeserver_name="policy.example", **settings),
        )
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def assert_cors(response: httpx.Response) -> None:
    for name, value in CORS.items():
        assert response.headers[name] == value


async def test_policy_server_documents_publish_the_policy_key(
    client_for: Callable[..., httpx.AsyncClient], identity: Identity
) -> None:
    client = client_for()
    policy_key = verify_key_base64(identity.policy_key)
    assert policy_key != verify_key_base64(identity.federation_key)

    r = await client.get("/.well-known/matrix/policy_server")
    assert r.status_code == 200
    assert r.json() == {"public_keys": {"ed25519": policy_key}}
    assert r.headers["content-type"] == "application/json"
    assert_cors(r)

    r = await client.get("/.well-known/matrix/org.matrix.msc4284.policy_server")
    assert r.status_code == 200
    assert r.json() == {"public_key": policy_key}
    assert_cors(r)

    for path in (
        "/.well-known/matrix/policy_server",
        "/.well-known/matrix/org.matrix.msc4284.policy_server",
    ):
        r = await client.options(
            path,
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
        )
        assert r.status_code == 204
        assert r.content == b""
        assert_cors(r)
        r = await client.post(path, content=b"{}")
        assert r.status_code == 405
        assert r.json()["errcode"] == "M_UNRECOGNIZED"


async def test_server_delegation(client_for: Callable[..., httpx.AsyncClient]) -> None:
    r = await client_for().get("/.well-known/matrix/server")
    assert r.status_code == 200
    assert r.json() == {"m.server": "policy.example:443"}
    r = await client_for(well_known_server="federation.example:8448").get(
        "/.well-known/matrix/server"
    )
    assert r.json() == {"m.server": "federation.example:8448"}


async def test_support_document(client_for: Callable[..., httpx.AsyncClient]) -> None:
    client = client_for(
        support_admin_contacts=["@admin:policy.example", "admin@policy.example"],
        support_security_contacts=["security@policy.example"],
        support_url="https://policy.example/help",
    )
    r = await client.get("/.well-known/matrix/support")
    assert r.status_code == 200
    assert r.json() == {
        "contacts": [
            {"matrix_id": "@admin:policy.example", "role": "m.role.admin"},
            {"email_address": "admin@policy.example", "role": "m.role.admin"},
            {"email_address": "security@policy.example", "role": "m.role.security"},
        ],
        "support_page": "https://policy.example/help",
    }
    assert_cors(r)
    r = await client.options("/.well-known/matrix/support")
    assert r.status_code == 204
    assert_cors(r)

    only_url = client_for(support_url="https://policy.example/help")
    r = await only_url.get("/.well-known/matrix/support")
    assert r.json() == {"support_page": "https://policy.example/help"}


async def test_support_document_is_not_found_when_unconfigured(
    client_for: Callable[..., httpx.AsyncClient],
) -> None:
    r = await client_for().get("/.well-known/matrix/support")
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_NOT_FOUND"


def test_support_contacts_are_validated_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PS_SUPPORT_ADMIN_CONTACTS", "@admin:policy.example, admin@example.org")
    assert load_settings().support_admin_contacts == ["@admin:policy.example", "admin@example.org"]
    monkeypatch.setenv("PS_SUPPORT_SECURITY_CONTACTS", "not-a-contact")
    with pytest.raises(SystemExit):
        load_settings()
    assert "PS_SUPPORT_SECURITY_CONTACTS" in capsys.readouterr().err

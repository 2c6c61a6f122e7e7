"""The gateway's federation basics: key document, version, Matrix-shaped errors, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from signedjson.key import generate_signing_key
from signedjson.sign import verify_signed_json

from tests.service_processes import ServiceProcess
from warden.matrix.ids import ServerName
from warden.matrix.keys import POLICY_SERVER_KEY_ID, decode_verify_key, key_id_of, verify_key_base64
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden_gateway.app import build_app

SERVER = ServerName("warden.test")


@pytest.fixture
def identity() -> Identity:
    fed = generate_signing_key("a_fed1")
    return Identity(SERVER, fed, key_id_of(fed), generate_signing_key("a_pol1"))


@pytest.fixture
async def client(identity: Identity) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(identity, Health("gateway"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


def assert_self_signed_key_document(doc: dict[str, object], identity: Identity) -> None:
    assert doc["server_name"] == SERVER
    verify_keys = doc["verify_keys"]
    assert isinstance(verify_keys, dict)
    # Only the federation key is published: never the policy key.
    assert set(verify_keys) == {identity.federation_key_id}
    assert POLICY_SERVER_KEY_ID not in verify_keys
    published = verify_keys[identity.federation_key_id]["key"]
    assert published == verify_key_base64(identity.federation_key)
    assert published != identity.policy_key_base64
    vk = decode_verify_key(identity.federation_key_id, published)
    verify_signed_json(doc, SERVER, vk)  # raises if the self-signature is wrong


async def test_key_document_is_self_signed_with_the_federation_key_only(
    client: httpx.AsyncClient, identity: Identity
) -> None:
    r = await client.get("/_matrix/key/v2/server")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert_self_signed_key_document(doc, identity)
    assert isinstance(doc["valid_until_ts"], int)
    # A tampered copy must not verify (the check above is a real one).
    doc["valid_until_ts"] += 1
    with pytest.raises(Exception, match="Unable to verify signature"):
        verify_signed_json(
            doc,
            SERVER,
            decode_verify_key(
                identity.federation_key_id, verify_key_base64(identity.federation_key)
            ),
        )


async def test_federation_version(client: httpx.AsyncClient) -> None:
    r = await client.get("/_matrix/federation/v1/version")
    assert r.status_code == 200
    assert r.json()["server"]["name"] == "warden"
    assert r.json()["server"]["version"]


async def test_unknown_path_and_wrong_method_are_matrix_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/_matrix/federation/v1/nonexistent")
    assert r.status_code == 404
    assert r.json() == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
    r = await client.post("/_matrix/key/v2/server", content=b"{}")
    assert r.status_code == 405
    assert r.json()["errcode"] == "M_UNRECOGNIZED"
    assert "GET" in r.headers["allow"]


async def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(
    client: httpx.AsyncClient,
) -> None:
    # Found by fuzzing /send: "/send/x%2F" decodes to "/send/x/", which the router
    # answered with a bodyless 307. Federation peers get Matrix errors only.
    for path in ("/_matrix/federation/v1/version/", "/_matrix/key/v2/server/"):
        r = await client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert r.json() == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


async def test_metrics_label_by_route_template_not_raw_path(client: httpx.AsyncClient) -> None:
    from prometheus_client import REGISTRY

    def count(route: str, status: str) -> float:
        v = REGISTRY.get_sample_value(
            "warden_http_requests_total", {"route": route, "method": "GET", "status": status}
        )
        return v or 0.0

    before = count("/_matrix/federation/v1/version", "200")
    unmatched_before = count("<unmatched>", "404")
    await client.get("/_matrix/federation/v1/version")
    await client.get("/_matrix/some/random/!room:id/path")
    assert count("/_matrix/federation/v1/version", "200") == before + 1
    assert count("<unmatched>", "404") == unmatched_before + 1


def test_running_gateway_serves_a_verifiable_key_document(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    from signedjson.key import read_signing_keys

    gw = spawn_service("gateway")
    gw.wait_ready()
    assert gw.api_url
    doc = httpx.get(f"{gw.api_url}/_matrix/key/v2/server").json()
    env_fed = gw.proc.args  # noqa: F841  (keys came from the key_paths fixture)
    key_file = next(p for p in gw.log_path.parent.iterdir() if p.name == "signing.key")
    fed = read_signing_keys(key_file.open())[0]
    pol = read_signing_keys((key_file.parent / "event_signing.key").open())[0]
    assert_self_signed_key_document(doc, Identity(SERVER, fed, key_id_of(fed), pol))
    assert gw.stop() == 0

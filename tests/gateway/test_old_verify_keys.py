"""Review L11: after a federation key rotation the old key stays verifiable.

``PS_OLD_VERIFY_KEYS`` lists retired federation keys; ``/_matrix/key/v2/server`` then
publishes them in ``old_verify_keys`` (with ``expired_ts``), inside the document the
current key signs, so a server fetching fresh keys can still verify what the old key
signed (Warden's earlier join and leave events, invite countersignatures).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json, verify_signed_json

from tests.service_processes import ServiceProcess
from warden.federation.server_key_document import verify_server_key_document
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import key_id_of, verify_key_base64
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.settings import Settings, load_settings
from warden_gateway.app import build_app

SERVER = ServerName("policy.example")


async def test_old_keys_are_published_signed_and_verify_what_they_signed() -> None:
    retired = generate_signing_key("a_old1")
    older = generate_signing_key("a_old0")
    current = generate_signing_key("a_new2")
    identity = Identity(SERVER, current, key_id_of(current), generate_signing_key("a_pol1"))
    retired_at = int(time.time() * 1000) - 3_600_000
    settings = Settings(
        homeserver_name=SERVER,
        old_verify_keys=(
            f"ed25519:a_old1={verify_key_base64(retired)}@{retired_at},"
            f" ed25519:a_old0={verify_key_base64(older)}@1700000000000"
        ),
    )
    # What the old key signed before the rotation, e.g. Warden's join event.
    join = sign_json({"type": "m.room.member", "content": {}}, SERVER, retired)

    app = build_app(identity, Health("gateway"), settings=settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        doc = (await client.get("/_matrix/key/v2/server")).json()

    assert doc["old_verify_keys"] == {
        "ed25519:a_old1": {"key": verify_key_base64(retired), "expired_ts": retired_at},
        "ed25519:a_old0": {"key": verify_key_base64(older), "expired_ts": 1700000000000},
    }
    assert set(doc["signatures"][SERVER]) == {"ed25519:a_new2"}  # signed by the current key
    # The check another server (and Warden's own keyring) makes on a fetched document.
    keys = verify_server_key_document(doc, SERVER, now_ms=int(time.time() * 1000))
    old = keys[KeyID("ed25519:a_old1")]
    assert old.expired and old.valid_until_ts == retired_at
    verify_signed_json(join, SERVER, old.verify_key)
    assert not keys[KeyID("ed25519:a_new2")].expired


async def test_without_the_setting_no_old_keys_and_the_current_key_is_never_listed_old() -> None:
    current = generate_signing_key("a_cur1")
    identity = Identity(SERVER, current, key_id_of(current), generate_signing_key("a_pol1"))
    for value in ("", f"ed25519:a_cur1={verify_key_base64(current)}@1700000000000"):
        app = build_app(
            identity,
            Health("gateway"),
            settings=Settings(homeserver_name=SERVER, old_verify_keys=value),
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw"
        ) as client:
            doc = (await client.get("/_matrix/key/v2/server")).json()
        assert doc["old_verify_keys"] == {}
        assert list(doc["verify_keys"]) == ["ed25519:a_cur1"]


@pytest.mark.parametrize(
    "value",
    [
        "ed25519:a_old1",
        "ed25519:a_old1=not-base64@1700000000000",
        "ed25519:a_old1={key}",
        "ed25519:a_old1={key}@soon",
        "curve25519:a_old1={key}@1700000000000",
        "ed25519:policy_server={key}@1700000000000",
        "ed25519:a_old1={key}@1,ed25519:a_old1={key}@2",
    ],
)
def test_bad_old_keys_stop_the_service_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = verify_key_base64(generate_signing_key("a_old1"))
    monkeypatch.setenv("PS_OLD_VERIFY_KEYS", value.format(key=key))
    with pytest.raises(SystemExit):
        load_settings()
    assert "PS_OLD_VERIFY_KEYS" in capsys.readouterr().err


@pytest.mark.slow
def test_running_gateway_publishes_the_old_keys(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    retired = generate_signing_key("a_gone")
    gw = spawn_service(
        "gateway", PS_OLD_VERIFY_KEYS=f"ed25519:a_gone={verify_key_base64(retired)}@1700000000000"
    )
    gw.wait_ready()
    doc = httpx.get(f"{gw.api_url}/_matrix/key/v2/server").json()
    keys = verify_server_key_document(doc, doc["server_name"], now_ms=int(time.time() * 1000))
    assert keys[KeyID("ed25519:a_gone")].key_base64 == verify_key_base64(retired)
    assert keys[KeyID("ed25519:a_gone")].expired
    assert gw.stop() == 0

"""``warden keygen --rotate`` (issue 15, operations review gap 15): a new key file, the
old one kept aside, and for the federation key the PS_OLD_VERIFY_KEYS value that keeps
what the old key signed verifiable."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from signedjson.sign import sign_json, verify_signed_json

from tests.services.test_cli import run_warden
from warden.federation.server_key_document import verify_server_key_document
from warden.matrix.ids import KeyID
from warden.matrix.keys import key_id_of, load_signing_key
from warden.runtime.health import Health
from warden.runtime.identity import load_identity
from warden.settings import Settings, parse_old_verify_keys
from warden_gateway.app import build_app

SERVER = "policy.example"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PS_HOMESERVER_NAME": SERVER,
        "PS_HOMESERVER_SIGNING_KEY_PATH": str(tmp_path / "signing.key"),
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(tmp_path / "event_signing.key"),
        **extra,
    }


def _printed_setting(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("PS_OLD_VERIFY_KEYS=")]
    assert len(lines) == 1, stdout
    return lines[0].removeprefix("PS_OLD_VERIFY_KEYS=")


async def test_a_rotated_federation_key_is_published_as_old_and_verifies_what_it_signed(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    assert run_warden("keygen", env=env).returncode == 0
    old_key = load_signing_key(tmp_path / "signing.key")
    policy_before = (tmp_path / "event_signing.key").read_text()
    # Warden's join event, signed before the rotation.
    join = sign_json({"type": "m.room.member", "content": {}}, SERVER, old_key)
    before_ms = int(time.time() * 1000)

    r = run_warden("keygen", "--rotate", "federation", env=env)
    assert r.returncode == 0, r.stderr

    new_key = load_signing_key(tmp_path / "signing.key")
    assert key_id_of(new_key) != key_id_of(old_key)
    assert oct((tmp_path / "signing.key").stat().st_mode & 0o777) == "0o600"
    retired = tmp_path / f"signing.key.{old_key.version}.retired"
    assert bytes(load_signing_key(retired)) == bytes(old_key)
    assert (tmp_path / "event_signing.key").read_text() == policy_before  # untouched
    value = _printed_setting(r.stdout)
    (entry,) = parse_old_verify_keys(value)
    assert entry.key_id == key_id_of(old_key) and entry.expired_ts >= before_ms

    # The gateway started with the printed setting publishes the old key, signed by the
    # new one, and a server fetching it can verify the old join event.
    settings = Settings(
        homeserver_name=SERVER,
        homeserver_signing_key_path=str(tmp_path / "signing.key"),
        homeserver_event_signing_key_path=str(tmp_path / "event_signing.key"),
        old_verify_keys=value,
    )
    app = build_app(load_identity(settings), Health("gateway"), settings=settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        doc = (await client.get("/_matrix/key/v2/server")).json()
    keys = verify_server_key_document(doc, SERVER, now_ms=int(time.time() * 1000))
    assert set(doc["signatures"][SERVER]) == {key_id_of(new_key)}
    old = keys[KeyID(key_id_of(old_key))]
    assert old.expired
    verify_signed_json(join, SERVER, old.verify_key)


def test_a_second_rotation_keeps_the_first_retired_key(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert run_warden("keygen", env=env).returncode == 0
    first = run_warden("keygen", "--rotate", "federation", env=env)
    assert first.returncode == 0, first.stderr
    env["PS_OLD_VERIFY_KEYS"] = _printed_setting(first.stdout)
    second = run_warden("keygen", "--rotate", "federation", env=env)
    assert second.returncode == 0, second.stderr
    listed = parse_old_verify_keys(_printed_setting(second.stdout))
    assert len(listed) == 2 and len({k.key_id for k in listed}) == 2
    current = key_id_of(load_signing_key(tmp_path / "signing.key"))
    assert current not in {k.key_id for k in listed}


def test_rotating_the_policy_key_prints_the_new_m_room_policy_key(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert run_warden("keygen", env=env).returncode == 0
    old = load_signing_key(tmp_path / "event_signing.key")
    federation_before = (tmp_path / "signing.key").read_text()
    r = run_warden("keygen", "--rotate", "policy", env=env)
    assert r.returncode == 0, r.stderr
    settings = Settings(
        homeserver_signing_key_path=str(tmp_path / "signing.key"),
        homeserver_event_signing_key_path=str(tmp_path / "event_signing.key"),
    )
    identity = load_identity(settings)
    assert bytes(identity.policy_key) != bytes(old)
    assert f'"ed25519": "{identity.policy_key_base64}"' in r.stdout
    assert "PS_OLD_VERIFY_KEYS" not in r.stdout  # the policy key is never a server key
    assert (tmp_path / "signing.key").read_text() == federation_before
    assert (tmp_path / f"event_signing.key.{old.version}.retired").exists()


def test_rotation_refuses_a_missing_key_and_an_existing_retired_copy(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = run_warden("keygen", "--rotate", "federation", env=env)
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert not (tmp_path / "signing.key").exists()  # nothing was created

    assert run_warden("keygen", env=env).returncode == 0
    old = load_signing_key(tmp_path / "signing.key")
    (tmp_path / f"signing.key.{old.version}.retired").write_text("an earlier copy\n")
    r = run_warden("keygen", "--rotate", "federation", env=env)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert bytes(load_signing_key(tmp_path / "signing.key")) == bytes(old)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

"""The ``warden`` command: keygen, settings errors, migrate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
from signedjson.key import read_signing_keys

from tests.conftest import PG_ADMIN


def run_warden(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    return subprocess.run(
        [sys.executable, "-m", "warden", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keygen_writes_two_distinct_synapse_format_keys(tmp_path: Path) -> None:
    fed, pol = tmp_path / "k" / "signing.key", tmp_path / "k" / "event_signing.key"
    env = {
        "PS_HOMESERVER_SIGNING_KEY_PATH": str(fed),
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(pol),
    }
    r = run_warden("keygen", env=env)
    assert r.returncode == 0, r.stderr
    for path in (fed, pol):
        line = path.read_text().strip()
        alg, version, seed = line.split(" ")
        assert alg == "ed25519"
        assert version.startswith("a_")
        assert "=" not in seed and len(seed) == 43  # unpadded base64 of 32 bytes
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    k1 = read_signing_keys(fed.open())[0]
    k2 = read_signing_keys(pol.open())[0]
    assert bytes(k1.verify_key) != bytes(k2.verify_key)
    # Running again keeps the existing keys.
    before = fed.read_text(), pol.read_text()
    r2 = run_warden("keygen", env=env)
    assert r2.returncode == 0 and "exists" in r2.stdout
    assert (fed.read_text(), pol.read_text()) == before


def test_keygen_refuses_the_same_key_in_both_roles(tmp_path: Path) -> None:
    fed = tmp_path / "signing.key"
    r = run_warden(
        "keygen",
        env={
            "PS_HOMESERVER_SIGNING_KEY_PATH": str(fed),
            "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(fed),
        },
    )
    assert r.returncode == 1
    assert "same key" in r.stderr


def test_bad_setting_stops_with_one_line_naming_the_variable() -> None:
    r = run_warden("migrate", env={"PS_HOMESERVER_DENIED_NETWORKS": "10.0.0.0/8,172.16.0.0./12"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "PS_HOMESERVER_DENIED_NETWORKS" in lines[0]
    assert "172.16.0.0./12" in lines[0]

    r = run_warden("migrate", env={"PS_HTTP_BIND": "localhost"})
    assert r.returncode == 2 and "PS_HTTP_BIND" in r.stderr

    r = run_warden("migrate", env={"PS_KEY_QUERY_SERVER": "matrix.org,ed25519:x,notbase64!"})
    assert r.returncode == 2 and "PS_KEY_QUERY_SERVER" in r.stderr


def test_migrate_command_applies_then_reports_up_to_date(empty_pg_database: str) -> None:
    r = run_warden("migrate", env={"PS_DATABASE": empty_pg_database})
    assert r.returncode == 0, r.stderr
    assert "applied migrations" in r.stdout
    r = run_warden("migrate", env={"PS_DATABASE": empty_pg_database})
    assert r.returncode == 0 and "up to date" in r.stdout


def test_migrate_reports_unreachable_database() -> None:
    base = PG_ADMIN.rsplit("@", 1)[0]
    r = run_warden("migrate", env={"PS_DATABASE": f"{base}@127.0.0.1:1/none"})
    assert r.returncode == 1
    assert "PS_DATABASE" in r.stderr
    assert asyncpg  # the driver is what reported it


def test_bad_filter_default_stops_every_service_with_one_line() -> None:
    for service in ("gateway", "webhooks"):
        r = run_warden(service, env={"PS_MANY_ATS_FILTER_MAX_ATS": "lots"})
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "PS_MANY_ATS_FILTER_MAX_ATS" in lines[0]

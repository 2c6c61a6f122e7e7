"""``warden check-config`` and ``warden --version`` (issue 15, the operator's tools)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import NATS_URL, REDIS_URL
from tests.services.test_cli import run_warden


def _keys(tmp_path: Path) -> dict[str, str]:
    env = {
        "PS_HOMESERVER_SIGNING_KEY_PATH": str(tmp_path / "signing.key"),
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(tmp_path / "event_signing.key"),
    }
    assert run_warden("keygen", env=env).returncode == 0
    return env


def test_version() -> None:
    r = run_warden("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("warden ") and r.stdout.split()[1][0].isdigit()


def test_everything_reachable_and_valid(tmp_path: Path, pg_database: str) -> None:
    env = {
        **_keys(tmp_path),
        "PS_DATABASE": pg_database,
        "PS_REDIS_URL": REDIS_URL,
        "PS_NATS_URL": NATS_URL,
    }
    r = run_warden("check-config", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert all(line.startswith("ok") for line in lines), r.stdout
    for what in ("settings", "signing keys", "postgresql", "redis", "nats"):
        assert any(line.split()[1].rstrip(":") == what.split()[0] for line in lines), what
    assert "schema up to date" in r.stdout


def test_every_bad_setting_is_a_line_of_its_own() -> None:
    env = {
        "PS_HTTP_BIND": "nowhere",
        "PS_JETSTREAM_REPLICAS": "9",
        "PS_KEYWORD_FILTER_USE_FULL_EVENT": "maybe",
    }
    r = run_warden("check-config", "--offline", env=env)
    assert r.returncode == 1
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 3, r.stdout
    for variable in env:
        assert sum(variable in line for line in failed) == 1, variable


def test_unreachable_dependencies_and_missing_keys_fail_without_leaking_passwords(
    tmp_path: Path,
) -> None:
    env = {
        "PS_HOMESERVER_SIGNING_KEY_PATH": str(tmp_path / "missing.key"),
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(tmp_path / "missing2.key"),
        "PS_DATABASE": "postgres://warden:pg-s3cret@127.0.0.1:1/warden",
        "PS_REDIS_URL": "redis://:redis-s3cret@127.0.0.1:1/0",
        "PS_NATS_URL": "nats://warden:nats-s3cret@127.0.0.1:1",
    }
    r = run_warden("check-config", env=env)
    assert r.returncode == 1
    failed = {
        line.split()[1].rstrip(":") for line in r.stdout.splitlines() if line.startswith("FAIL")
    }
    assert {"signing", "postgresql", "redis", "nats"} <= failed, r.stdout
    assert "s3cret" not in r.stdout + r.stderr


def test_offline_checks_no_server(tmp_path: Path) -> None:
    env = {**_keys(tmp_path), "PS_DATABASE": "postgres://nobody@127.0.0.1:1/none"}
    r = run_warden("check-config", "--offline", env=env)
    assert r.returncode == 0, r.stdout
    assert "postgresql" not in r.stdout

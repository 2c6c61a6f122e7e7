"""Secret settings from files: PS_<NAME>_FILE (issue 15, operations review gap 11)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NATS_URL, REDIS_URL
from tests.services.test_cli import run_warden
from warden.secret_files import SECRET_SETTINGS, file_variables
from warden.settings import Settings, SettingsError, load_settings
from warden.storage.database import create_pool

# A valid value for each secret setting, as its file would hold it.
SAMPLES = {
    "database": "postgres://warden:pw-from-file@db.internal/warden",
    "api_key": "admin-key-from-file",
    "moderator_access_tokens": "matrix.example:syt_token_from_file",
    "redis_url": "redis://warden:pw-from-file@redis.internal:6379/0",
    "redis_sentinel_password": "sentinel-pw-from-file",
    "nats_url": "tls://warden:pw-from-file@nats.internal:4222",
}


def _clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_SETTINGS:
        monkeypatch.delenv(f"PS_{name.upper()}", raising=False)
        monkeypatch.delenv(f"PS_{name.upper()}_FILE", raising=False)


def test_every_secret_setting_has_a_sample() -> None:
    assert set(SAMPLES) == set(SECRET_SETTINGS)
    assert set(SECRET_SETTINGS) <= set(Settings.model_fields)


@pytest.mark.parametrize("name", SECRET_SETTINGS)
def test_each_secret_setting_is_read_from_its_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear(monkeypatch)
    path = tmp_path / name
    path.write_text(SAMPLES[name] + "\n")  # as `echo` writes it: the newline is dropped
    monkeypatch.setenv(f"PS_{name.upper()}_FILE", str(path))
    value = getattr(load_settings(), name)
    if name == "moderator_access_tokens":
        assert value == [SAMPLES[name]]
    else:
        assert value == SAMPLES[name]
    # The secret is not in the settings' repr (it may end up in a log or a traceback).
    assert "from-file" not in repr(load_settings())


def test_only_one_trailing_newline_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear(monkeypatch)
    (tmp_path / "k").write_bytes(b" key with spaces \n\n")
    monkeypatch.setenv("PS_API_KEY_FILE", str(tmp_path / "k"))
    assert load_settings().api_key == " key with spaces \n"
    (tmp_path / "k").write_bytes(b"windows-key\r\n")
    assert load_settings().api_key == "windows-key"


def test_setting_a_value_and_its_file_is_refused_without_showing_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clear(monkeypatch)
    (tmp_path / "k").write_text("key-in-file")
    monkeypatch.setenv("PS_API_KEY_FILE", str(tmp_path / "k"))
    monkeypatch.setenv("PS_API_KEY", "key-in-env")
    with pytest.raises(SettingsError):
        load_settings()
    err = capsys.readouterr().err
    assert "PS_API_KEY_FILE" in err and "not both" in err
    assert "key-in-file" not in err and "key-in-env" not in err


def test_an_empty_value_beside_a_file_means_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Helm templates and Compose files render both variables, one of them empty.
    _clear(monkeypatch)
    (tmp_path / "k").write_text("key-in-file")
    monkeypatch.setenv("PS_API_KEY_FILE", str(tmp_path / "k"))
    monkeypatch.setenv("PS_API_KEY", "")
    assert load_settings().api_key == "key-in-file"
    monkeypatch.setenv("PS_API_KEY", "key-in-env")
    monkeypatch.setenv("PS_API_KEY_FILE", "")
    assert load_settings().api_key == "key-in-env"


def test_an_unreadable_file_stops_start_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clear(monkeypatch)
    monkeypatch.setenv("PS_DATABASE_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("warden: invalid setting PS_DATABASE:")
    assert "PS_DATABASE_FILE" in err and "No such file" in err
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    monkeypatch.setenv("PS_DATABASE_FILE", str(tmp_path / "binary"))
    with pytest.raises(SettingsError):
        load_settings()
    assert "not UTF-8" in capsys.readouterr().err


def test_the_file_is_read_once_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    (tmp_path / "k").write_text("first")
    monkeypatch.setenv("PS_API_KEY_FILE", str(tmp_path / "k"))
    settings = load_settings()
    (tmp_path / "k").write_text("second")
    assert settings.api_key == "first"


def test_check_config_reaches_every_dependency_with_urls_from_files(
    tmp_path: Path, pg_database: str
) -> None:
    env = {
        "PS_HOMESERVER_SIGNING_KEY_PATH": str(tmp_path / "signing.key"),
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(tmp_path / "event_signing.key"),
    }
    assert run_warden("keygen", env=env).returncode == 0
    for name, value in (
        ("database", pg_database),
        ("redis_url", REDIS_URL),
        ("nats_url", NATS_URL),
    ):
        (tmp_path / name).write_text(value + "\n")
        env[f"PS_{name.upper()}_FILE"] = str(tmp_path / name)
    r = run_warden("check-config", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "schema up to date" in r.stdout

    env["PS_API_KEY_FILE"] = str(tmp_path / "missing")
    r = run_warden("check-config", "--offline", env=env)
    assert r.returncode == 1
    assert "PS_API_KEY_FILE" in r.stdout


async def test_a_database_url_from_a_file_opens_the_pool(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear(monkeypatch)
    (tmp_path / "db").write_text(pg_database + "\n")
    monkeypatch.setenv("PS_DATABASE_FILE", str(tmp_path / "db"))
    pool = await create_pool(load_settings())
    try:
        assert await pool.fetchval("SELECT current_database()") == pg_database.rsplit("/", 1)[1]
    finally:
        await pool.close()


@pytest.mark.parametrize(("size", "named_statements"), [(100, True), (0, False)])
async def test_the_statement_cache_setting_reaches_asyncpg(
    make_settings: Callable[..., Settings], size: int, named_statements: bool
) -> None:
    # PgBouncer in transaction mode needs size 0: no named prepared statements kept on a
    # server connection that the next transaction may not get.
    pool = await create_pool(make_settings(database_statement_cache_size=size))
    try:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT $1::int + 1", 1)
            kept = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
        assert (kept > 0) is named_statements
    finally:
        await pool.close()


def test_warden_dev_keeps_an_api_key_given_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warden.dev.stack import DevSettings, make_plan

    _clear(monkeypatch)
    (tmp_path / "k").write_text("key-in-file\n")
    monkeypatch.setenv("PS_API_KEY_FILE", str(tmp_path / "k"))
    plan = make_plan(load_settings(), DevSettings(), tmp_path / "dev")
    # Setting PS_API_KEY beside the file would stop every service ("not both").
    assert "PS_API_KEY" not in plan.env
    assert plan.env["PS_API_KEY_FILE"] == str(tmp_path / "k")


def test_file_variables_names_each_secret_setting() -> None:
    assert file_variables() == {f"PS_{name.upper()}_FILE" for name in SECRET_SETTINGS}
    assert "PS_API_KEY_FILE" in file_variables()

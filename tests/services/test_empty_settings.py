"""An empty PS_* variable means "not set" (issue 15: Compose files and Helm templates
write them, and `PS_JOIN_SERVER=` stopped every service), except where policyserv gives
the empty value a meaning: an empty list turns a filter off, an empty
PS_KEY_QUERY_SERVER means no notary."""

from __future__ import annotations

import os
import subprocess
import sys

from warden.policy.config import instance_defaults, known_keys
from warden.settings import Settings


def _settings_from(env: dict[str, str]) -> Settings:
    old = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_empty_scalars_take_their_defaults() -> None:
    s = _settings_from(
        {
            "PS_JOIN_SERVER": "",
            "PS_DATABASE_MAX_OPEN_CONNS": "",
            "PS_DIRECT_KEY_FETCHING": "",
            "PS_HTTP_BIND": "",
            "PS_TLS_CERT_PATH": "",
            "PS_JETSTREAM_REPLICAS": "",
        }
    )
    d = Settings()
    assert s.join_server == d.join_server == "matrix.org"
    assert s.database_max_open_conns == d.database_max_open_conns
    assert s.direct_key_fetching is d.direct_key_fetching
    assert s.http_bind == d.http_bind
    assert s.tls_cert_path is None
    assert s.jetstream_replicas is None


def test_empty_lists_and_notary_keep_their_meaning() -> None:
    s = _settings_from({"PS_TRUSTED_ORIGINS": "", "PS_KEY_QUERY_SERVER": ""})
    assert s.trusted_origins == []
    assert s.notary is None


def test_filter_defaults_from_empty_variables() -> None:
    keys = known_keys()
    numbers = [k for k in keys.values() if k.type in ("int", "float", "bool")]
    lists = [k for k in keys.values() if k.type == "list[str]" and k.default]
    assert numbers and lists
    values = instance_defaults({k.env_var: "" for k in [*numbers, *lists]})
    for k in numbers:
        assert values[k.name] == k.default, k.env_var
    for k in lists:
        assert values[k.name] == [], k.env_var  # policyserv: empty disables


def test_a_command_runs_past_empty_variables(empty_pg_database: str) -> None:
    """The settings check that stopped every service on `PS_JOIN_SERVER=` (exit 2)."""
    env = {
        **os.environ,
        "PS_DATABASE": empty_pg_database,
        "PS_JOIN_SERVER": "",
        "PS_FILTER_TIMEOUT_SECONDS": "",
        "PS_KEYWORD_FILTER_USE_FULL_EVENT": "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "warden", "migrate", "--status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr  # ran: every migration is pending
    assert "pending" in done.stdout

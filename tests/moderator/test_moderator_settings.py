"""``PS_MODERATOR_ACCESS_TOKENS`` and the delivery settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from warden.settings import Settings, parse_moderator_tokens


def test_policyserv_format_and_base_urls_are_accepted() -> None:
    tokens = parse_moderator_tokens(
        [
            "matrix-client.matrix.org:syt_a",
            "gnome.ems.host:8448:syt_b",
            "http://127.0.0.1:8008:syt_c",
            "https://hs.example/prefix/:syt_d",
        ]
    )
    assert [(t.base_url, t.access_token) for t in tokens] == [
        ("https://matrix-client.matrix.org", "syt_a"),
        ("https://gnome.ems.host:8448", "syt_b"),
        ("http://127.0.0.1:8008", "syt_c"),
        ("https://hs.example/prefix", "syt_d"),
    ]
    assert "syt_a" not in repr(tokens)


@pytest.mark.parametrize(
    "entry", ["no-colon-token", "matrix.org:", ":syt_a", "ftp://x.test:syt_a", "x.test:99999:t"]
)
def test_malformed_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="entry 1"):
        parse_moderator_tokens([entry])


def test_settings_read_csv_and_defaults() -> None:
    s = Settings(moderator_access_tokens="a.test:t1, b.test:t2")
    assert s.moderator_access_tokens == ["a.test:t1", "b.test:t2"]
    assert s.allowed_webhook_domains == ["element.ems.host"]
    assert s.moderation_pool_size == 25 and s.webhook_pool_size == 5
    with pytest.raises(ValidationError):
        Settings(webhook_ca_file="/nonexistent/ca.pem")


def test_bad_token_setting_stops_the_service_without_printing_the_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PS_MODERATOR_ACCESS_TOKENS"] = "good.test:syt_fine,ftp://bad.test:syt_secret"
    result = subprocess.run(
        [sys.executable, "-m", "warden", "moderator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PS_MODERATOR_ACCESS_TOKENS" in result.stderr
    assert "entry 2" in result.stderr
    assert "syt_secret" not in result.stderr + result.stdout

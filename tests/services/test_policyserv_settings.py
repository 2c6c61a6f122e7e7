"""policyserv's ``PS_*`` settings: every one of its README is accepted; those Warden does
not use are warned about once each at start; two old names feed Warden's keys."""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
import pytest

from tests.service_processes import ServiceProcess
from warden.policy.config import ConfigError, instance_defaults, known_keys
from warden.policyserv_settings import IGNORED_SETTINGS, ignored_settings_in, warn_ignored_settings
from warden.settings import ENV_PREFIX, Settings


def policyserv_readme_settings() -> set[str]:
    """Every PS_* variable policyserv's README names (its wildcard mention excluded).

    Written out (the README is not part of this repository): policyserv's README as of
    its migration 18.
    """
    return {
        *IGNORED_SETTINGS,
        "PS_ALLOWED_WEBHOOK_DOMAINS", "PS_API_KEY", "PS_DATABASE", "PS_DATABASE_MAX_IDLE_CONNS",
        "PS_DATABASE_MAX_OPEN_CONNS", "PS_DENSITY_FILTER_MAX_DENSITY",
        "PS_DENSITY_FILTER_MIN_TRIGGER_LENGTH", "PS_EVENT_TYPE_PREFILTER_ALLOWED_EVENT_TYPES",
        "PS_EVENT_TYPE_PREFILTER_ALLOWED_STATE_EVENT_TYPES", "PS_HELLBAN_POSTFILTER_MINUTES",
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH", "PS_HOMESERVER_NAME",
        "PS_HOMESERVER_SIGNING_KEY_PATH", "PS_HTTP_BIND", "PS_HTTP_METRICS_BIND",
        "PS_JOIN_LOCALPART", "PS_JOIN_ROOM_IDS", "PS_JOIN_SERVER", "PS_KEYWORD_FILTER_KEYWORDS",
        "PS_KEY_QUERY_SERVER", "PS_LENGTH_FILTER_MAX_LENGTH", "PS_MANY_ATS_FILTER_MAX_ATS",
        "PS_MEDIA_FILTER_MEDIA_TYPES", "PS_MENTION_FILTER_MAX_MENTIONS",
        "PS_MENTION_FILTER_MIN_PLAINTEXT_LENGTH", "PS_MJOLNIR_FILTER_ENABLED",
        "PS_MJOLNIR_FILTER_ROOM_ID", "PS_MODERATION_POOL_SIZE", "PS_MODERATOR_ACCESS_TOKENS",
        "PS_SENDER_PREFILTER_ALLOWED_SENDERS", "PS_SPAM_THRESHOLD",
        "PS_TRIM_FILTER_MAX_DIFFERENCE", "PS_TRUSTED_ORIGINS", "PS_WEBHOOK_POOL_SIZE",
    }  # fmt: skip


def test_every_readme_setting_is_read_or_explained() -> None:
    read = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    read |= {key.env_var for key in known_keys().values()}
    read |= {"PS_TRIM_FILTER_MAX_DIFFERENCE", "PS_MJOLNIR_FILTER_ROOM_ID"}
    unexplained = policyserv_readme_settings() - read - set(IGNORED_SETTINGS)
    assert unexplained == set()
    # And nothing Warden reads is called ignored.
    env = dict.fromkeys(policyserv_readme_settings(), "x")
    warned = {name for name, _ in ignored_settings_in(env)}
    assert warned == set(IGNORED_SETTINGS) - read
    assert warned  # the table is not dead code


def test_each_ignored_setting_that_is_set_warns_once_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"PS_STATE_CACHE_MINUTES": "5", "PS_PROCESSING_POOL_SIZE": "100"}
    env["PS_KEYWORD_FILTER_KEYWORDS"] = "spam"  # read by Warden: no warning
    with caplog.at_level(logging.WARNING, logger="warden.policyserv_settings"):
        assert warn_ignored_settings(env) == ["PS_PROCESSING_POOL_SIZE", "PS_STATE_CACHE_MINUTES"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("PS_PROCESSING_POOL_SIZE is a policyserv setting Warden ")
    assert "filter-worker processes" in messages[0]
    assert messages[1].startswith("PS_STATE_CACHE_MINUTES ")
    assert "learns room state" in messages[1]
    caplog.clear()
    assert warn_ignored_settings({}) == []
    assert caplog.records == []


def test_trim_filter_max_difference_is_an_alias() -> None:
    assert instance_defaults({})["trim_length_filter_max_difference"] == 25
    legacy = {"PS_TRIM_FILTER_MAX_DIFFERENCE": "7"}
    assert instance_defaults(legacy)["trim_length_filter_max_difference"] == 7
    # Warden's own name wins over the alias.
    both = {**legacy, "PS_TRIM_LENGTH_FILTER_MAX_DIFFERENCE": "9"}
    assert instance_defaults(both)["trim_length_filter_max_difference"] == 9
    # A bad value names the variable the operator wrote.
    with pytest.raises(ConfigError) as err:
        instance_defaults({"PS_TRIM_FILTER_MAX_DIFFERENCE": "lots"})
    assert err.value.key == "PS_TRIM_FILTER_MAX_DIFFERENCE"


def test_mjolnir_filter_room_id_is_the_default_policy_list() -> None:
    assert instance_defaults({})["policy_list_room_ids"] == []
    env = {"PS_MJOLNIR_FILTER_ROOM_ID": "!banlist:example.org"}
    assert instance_defaults(env)["policy_list_room_ids"] == ["!banlist:example.org"]
    assert instance_defaults({"PS_MJOLNIR_FILTER_ROOM_ID": ""})["policy_list_room_ids"] == []
    env["PS_POLICY_LIST_ROOM_IDS"] = "!a:example.org,!b:example.org"
    assert instance_defaults(env)["policy_list_room_ids"] == ["!a:example.org", "!b:example.org"]


def test_settings_accept_every_readme_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in IGNORED_SETTINGS:
        monkeypatch.setenv(name, "anything")
    settings = Settings()
    assert settings.homeserver_name  # loads; the ignored variables did not break it


@pytest.mark.slow
def test_a_service_warns_at_start_once_per_ignored_setting(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    svc = spawn_service(
        "webhooks",
        PS_HTTP_PPROF_BIND="127.0.0.1:6060",
        PS_DATABASE_READ="postgres://replica/db",
        PS_TRIM_FILTER_MAX_DIFFERENCE="30",  # an alias: read, not warned about
    )
    svc.wait_ready()
    assert svc.stop() == 0
    lines = [orjson.loads(x) for x in svc.output().splitlines() if x.startswith("{")]
    ignored = [x for x in lines if x.get("event") == "ignored_setting"]
    assert sorted(x["setting"] for x in ignored) == ["PS_DATABASE_READ", "PS_HTTP_PPROF_BIND"]
    assert all(x["level"] == "WARNING" for x in ignored)
    assert "sk-whatever" not in svc.output()  # the value (a secret, maybe) is not logged

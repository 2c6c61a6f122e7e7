"""policyserv's ``PS_*`` settings that Warden accepts but does not use, and its old names.

An operator moving from policyserv keeps its environment: every variable of policyserv's
README is accepted. Those Warden has no use for are listed here with the reason, and a
service logs one warning per such variable that is set (``warn_ignored_settings``, called
at bootstrap), so nobody believes a setting took effect when it did not.

Two policyserv names map onto Warden's community config keys (read by
``warden.policy.config.instance_defaults``, see ``LEGACY_ENV_NAMES``):

- ``PS_TRIM_FILTER_MAX_DIFFERENCE`` (the README's spelling) sets
  ``trim_length_filter_max_difference``;
- ``PS_MJOLNIR_FILTER_ROOM_ID`` (one room per instance in policyserv) becomes the
  instance default of ``policy_list_room_ids``.

Warden's own name wins when both are set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

_READ_REPLICA = "Warden reads and writes through one database pool (PS_DATABASE)"

# Variable → why Warden ignores it. A variable that a later Warden declares (a setting
# or a filter's config key) is never warned about, whatever this table says.
IGNORED_SETTINGS: dict[str, str] = {
    "PS_DATABASE_MIGRATIONS_DIR": "migrations ship inside Warden; run `warden migrate`",
    "PS_DATABASE_READ": _READ_REPLICA,
    "PS_DATABASE_READ_MAX_OPEN_CONNS": _READ_REPLICA,
    "PS_DATABASE_READ_MAX_IDLE_CONNS": _READ_REPLICA,
    "PS_HTTP_PPROF_BIND": "Go's pprof has no Python equivalent; use the metrics on "
    "PS_HTTP_METRICS_BIND",
    "PS_PROCESSING_POOL_SIZE": "events are judged by filter-worker processes (run more of "
    "them) in batches (PS_EVALUATION_BATCH_LINGER_MS), not by a goroutine pool",
    "PS_STATE_CACHE_MINUTES": "Warden learns room state from every /send transaction and "
    "refreshes it every PS_STATE_CACHE_INTERVAL_MINUTES; there is no per-event staleness "
    "check",
}

# Community config key → policyserv variables read for its instance default when
# Warden's own PS_<KEY> is not set (values are parsed with the key's type: a single
# room ID is a one-element list).
LEGACY_ENV_NAMES: dict[str, tuple[str, ...]] = {
    "trim_length_filter_max_difference": ("PS_TRIM_FILTER_MAX_DIFFERENCE",),
    "policy_list_room_ids": ("PS_MJOLNIR_FILTER_ROOM_ID",),
}


def _declared_names() -> set[str]:
    """Every ``PS_*`` variable Warden reads: settings, config keys and legacy names."""
    from warden.policy.config import known_keys
    from warden.settings import ENV_PREFIX, Settings

    names = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    names.update(key.env_var for key in known_keys().values())
    for legacy in LEGACY_ENV_NAMES.values():
        names.update(legacy)
    return names


def ignored_settings_in(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The set policyserv variables Warden ignores, with why, in a stable order."""
    declared = _declared_names()
    return [
        (name, reason)
        for name, reason in IGNORED_SETTINGS.items()
        if name in environ and name not in declared
    ]


def warn_ignored_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Log one warning per ignored policyserv variable that is set; return their names."""
    env = os.environ if environ is None else environ
    warned = []
    for name, reason in ignored_settings_in(env):
        logger.warning(
            f"{name} is a policyserv setting Warden ignores: {reason}",
            extra={"event": "ignored_setting", "setting": name},
        )
        warned.append(name)
    return warned

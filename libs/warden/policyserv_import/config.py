"""Policyserv community configurations checked against Warden's declared keys.

Policyserv never validated its stored JSON (unknown keys were ignored), so a community
may hold keys Warden does not know (those of unmerged filters), instance-only ones,
or values of another type. Keys Warden knows are kept, with lossless conversions (an
integral number for an integer key, a CSV string for a list); every other key is
dropped and reported with the reason, as Warden refuses unknown keys.
"""

from __future__ import annotations

from typing import Any

from warden.policy.config import ConfigError, check_value, known_keys


def _convert(kind: str, value: Any) -> Any:
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "list[str]" and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def map_config(raw: object) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Warden's config for a policyserv config, and ``(key, reason)`` for each key dropped."""
    if not isinstance(raw, dict):
        return {}, [("config", "not a JSON object: the community starts with no overrides")]
    keys = known_keys()
    kept: dict[str, Any] = {}
    dropped: list[tuple[str, str]] = []
    for name in sorted(raw):
        value = raw[name]
        key = keys.get(name)
        if key is None:
            dropped.append((name, "unknown to Warden (no filter of Warden reads it)"))
            continue
        if key.instance_only:
            dropped.append((name, f"an instance setting in Warden: set {key.env_var}"))
            continue
        if value is None:
            continue  # policyserv's pointer fields: null is unset
        try:
            kept[name] = check_value(key, _convert(key.type, value))
        except ConfigError as exc:
            dropped.append((name, f"value not accepted: {exc.message}"))
    return kept, dropped

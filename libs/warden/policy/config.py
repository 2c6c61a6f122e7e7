"""Community configuration: declared keys, instance defaults, community overrides.

Each filter declares its keys next to its code (``declare(...)`` in its module). Three
layers make a community's effective configuration, as in policyserv:

1. the key's code default;
2. the instance default from the environment, ``PS_`` + the key in upper case
   (``keyword_filter_keywords`` → ``PS_KEYWORD_FILTER_KEYWORDS``; lists are CSV);
3. the community's stored JSON, where a present key wins even when it is ``false``,
   ``0`` or ``[]`` (unset is not false). Lists replace, never merge.

Unknown keys and wrong types in a community's JSON are refused with the key named.
Legacy keys (``LEGACY_KEYS``, left over from policyserv's removed score model) are
accepted and ignored; ``legacy_key_warnings`` says so to whoever sets them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from warden.policyserv_settings import LEGACY_ENV_NAMES

KeyType = Literal["bool", "int", "float", "str", "list[str]", "object"]

# Importing this module registers every filter's keys (see ``known_keys``).
FILTER_REGISTRY_MODULE = "warden.filters.registry"


class ConfigError(ValueError):
    """A configuration value is invalid; ``key`` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class ConfigKey:
    """One configuration key."""

    name: str
    type: KeyType
    default: Any
    doc: str
    # Instance-only keys (secrets, server-wide lists) come from the environment only;
    # a community cannot set them.
    instance_only: bool = False
    # Checks beyond the type (``object`` keys mostly): returns the value normalised or
    # raises ``ConfigError``. Run when a community's config or an instance default is read.
    validate: Callable[[Any], Any] | None = field(default=None, compare=False)

    @property
    def env_var(self) -> str:
        """The environment variable holding the instance default."""
        return "PS_" + self.name.upper()


_KEYS: dict[str, ConfigKey] = {}


def declare(*keys: ConfigKey) -> tuple[ConfigKey, ...]:
    """Register keys (called at import time by the module that owns them)."""
    for key in keys:
        existing = _KEYS.get(key.name)
        if existing is not None and existing != key:
            raise RuntimeError(f"config key {key.name!r} declared twice")
        check_value(key, key.default)
        _KEYS[key.name] = key
    return keys


def known_keys() -> Mapping[str, ConfigKey]:
    """Every declared key, with every filter's keys loaded."""
    importlib.import_module(FILTER_REGISTRY_MODULE)
    return dict(_KEYS)


def check_value(key: ConfigKey, value: Any) -> Any:
    """Return ``value`` if it has the key's type (ints are accepted as floats)."""
    t = key.type
    ok = (
        (t == "bool" and isinstance(value, bool))
        or (t == "int" and isinstance(value, int) and not isinstance(value, bool))
        or (t == "float" and isinstance(value, int | float) and not isinstance(value, bool))
        or (t == "str" and isinstance(value, str))
        or (t == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value))
        or (t == "object" and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(key.name, f"must be {_describe(t)}, not {type(value).__name__}")
    return float(value) if t == "float" else value


def _describe(t: KeyType) -> str:
    return {
        "bool": "a boolean",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "list[str]": "a list of strings",
        "object": "a JSON object",
    }[t]


def parse_env_value(key: ConfigKey, raw: str) -> Any:
    """Parse an environment value for ``key`` (policyserv's formats). Raises ConfigError."""
    t = key.type
    text = raw.strip()
    try:
        if t == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be true or false")
        if t == "int":
            return int(text)
        if t == "float":
            return float(text)
        if t == "list[str]":
            return [item.strip() for item in raw.split(",") if item.strip()]
        if t == "object":
            value = orjson.loads(text or "{}")
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
            return value
        return raw
    except ValueError as exc:
        raise ConfigError(key.name, str(exc)) from None


def instance_defaults(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Code defaults overlaid with ``PS_*`` environment values.

    Raises ``ConfigError`` (its key is the environment variable) on a bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key in known_keys().values():
        # Warden's name first, then policyserv's (e.g. PS_TRIM_FILTER_MAX_DIFFERENCE).
        env_var = key.env_var
        raw = env.get(env_var)
        for legacy in LEGACY_ENV_NAMES.get(key.name, ()):
            if raw is not None:
                break
            env_var, raw = legacy, env.get(legacy)
        # Empty means unset for a number or a switch (Compose and Helm write empty
        # variables); for a list or text, empty is policyserv's way to turn a filter off.
        if raw is None or (not raw.strip() and key.type in ("bool", "int", "float", "object")):
            values[key.name] = key.default
            continue
        try:
            values[key.name] = parse_env_value(key, raw)
            if key.validate is not None:
                values[key.name] = key.validate(values[key.name])
        except ConfigError as exc:
            raise ConfigError(env_var, exc.message) from None
    return values


def validate_community_config(data: object) -> dict[str, Any]:
    """Check a community's config JSON; return it normalised. Raises ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError("config", "must be a JSON object")
    keys = known_keys()
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = keys.get(name)
        if key is None:
            raise ConfigError(name, "unknown configuration key")
        if key.instance_only:
            raise ConfigError(name, "can only be set by the instance operator")
        out[name] = check_value(key, value)
        if key.validate is not None:
            out[name] = key.validate(out[name])
    return out


class EffectiveConfig(Mapping[str, Any]):
    """A community's configuration after layering, with typed getters for filters.

    Immutable: the pipeline remembers which filters an instance enables.
    """

    def __init__(self, instance: Mapping[str, Any], community: Mapping[str, Any]) -> None:
        self._values = {**instance, **community}

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def get_bool(self, name: str) -> bool:
        """A boolean key's value."""
        return bool(self._values[name])

    def get_int(self, name: str) -> int:
        """An integer key's value."""
        return int(self._values[name])

    def get_float(self, name: str) -> float:
        """A number key's value."""
        return float(self._values[name])

    def get_str(self, name: str) -> str:
        """A string key's value."""
        return str(self._values[name])

    def get_list(self, name: str) -> list[str]:
        """A list key's value."""
        return list(self._values[name])


# Keys that belong to the community rather than to one filter.
COMMUNITY_KEYS = declare(
    ConfigKey(
        "webhook_url",
        "str",
        "",
        "https URL that receives an audit message for each refused event; its host must "
        "be in PS_ALLOWED_WEBHOOK_DOMAINS. Empty disables.",
    ),
    ConfigKey(
        "spam_threshold",
        "float",
        0.8,
        "Accepted for compatibility with policyserv's stored configs and ignored: "
        "verdicts are classes, not scores.",
    ),
)


# Keys policyserv communities may still hold from its removed score model (≤ v1.7.0,
# reference §3.1): the only community key of that model was the threshold; the group
# ranges were constants. Declared above so stored configs still load and validate,
# and ignored by every filter.
LEGACY_KEYS: Mapping[str, str] = {
    "spam_threshold": "policyserv's removed score model; verdicts are classes, not scores",
}


def legacy_key_warnings(data: Mapping[str, object]) -> list[str]:
    """One warning per legacy key set in ``data`` (a community's config or patch)."""
    return [
        f"{name}: accepted for compatibility and ignored ({LEGACY_KEYS[name]})"
        for name in data
        if name in LEGACY_KEYS and data[name] is not None
    ]

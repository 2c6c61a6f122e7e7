"""``PS_<NAME>_FILE``: secret settings read from files (Docker and Kubernetes secrets).

For every setting in ``SECRET_SETTINGS`` an operator may give, instead of the value, the
path of a file that holds it (``PS_API_KEY_FILE=/run/secrets/api_key``), so secrets stay
out of ConfigMaps, ``docker inspect`` and process listings. The file is read once, when the
settings are loaded, and one trailing newline is dropped (what ``echo`` and most editors
add). Setting both ``PS_X`` and ``PS_X_FILE`` is an error; an empty variable means unset,
as for every ``PS_*`` variable.

This is a pydantic-settings source placed just after the explicit arguments and before the
environment. A problem (unreadable file, both variables set) does not raise from the
source, which pydantic would not attribute to a setting: the source hands the field a
``SecretFileProblem``, and the settings model turns it into a validation error of that
field, so ``load_settings`` and ``warden check-config`` report it like any bad value.
Neither the problem nor its message ever carries the secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

# Settings whose values are (or contain) credentials. Each also accepts PS_<NAME>_FILE.
SECRET_SETTINGS = (
    "database",
    "api_key",
    "moderator_access_tokens",
    "redis_url",
    "redis_sentinel_password",
    "nats_url",
)

FILE_SUFFIX = "_FILE"


def file_variables(prefix: str = "PS_") -> frozenset[str]:
    """Every ``PS_<NAME>_FILE`` variable, for checks of deployment files."""
    return frozenset(f"{prefix}{name.upper()}{FILE_SUFFIX}" for name in SECRET_SETTINGS)


class SecretFileProblem:
    """What a ``PS_<NAME>_FILE`` could not provide; the message names the variables."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"SecretFileProblem({self.message!r})"


def read_secret_file(variable: str, path: str) -> str | SecretFileProblem:
    """The contents of ``path`` without one trailing newline, or what went wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return SecretFileProblem(f"cannot read {variable}={path!r}: {exc.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return SecretFileProblem(f"{variable}={path!r} is not UTF-8 text")
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


class SecretFilesSource(PydanticBaseSettingsSource):
    """Values of the secret settings from the files named by ``<prefix><NAME>_FILE``."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(settings_cls)
        self._prefix = str(settings_cls.model_config.get("env_prefix", ""))
        source = os.environ if environ is None else environ
        # The environment source matches names case-insensitively; so does this one.
        self._env = {name.lower(): value for name, value in source.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """One field's value from its file (``None`` when its ``_FILE`` is unset)."""
        variable = f"{self._prefix}{field_name}{FILE_SUFFIX}".upper()
        path = self._env.get(variable.lower(), "")
        if not path:
            return None, field_name, False
        direct = f"{self._prefix}{field_name}".upper()
        if self._env.get(direct.lower(), ""):
            return SecretFileProblem(f"set {direct} or {variable}, not both"), field_name, False
        return read_secret_file(variable, path), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_SETTINGS:
            field = self.settings_cls.model_fields.get(name)
            if field is None:
                continue
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


def check_secret_file_problem(value: Any) -> Any:
    """Raise a ``ValueError`` for a ``SecretFileProblem``; pass anything else through."""
    if isinstance(value, SecretFileProblem):
        raise ValueError(value.message)
    return value

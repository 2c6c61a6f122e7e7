"""Settings from ``PS_*`` environment variables.

Names and defaults follow the Go reference implementation (policyserv) wherever the
setting exists there, so operators can move over unchanged; settings new to Warden's
design are marked as such. List-valued settings are comma-separated, as in policyserv.

A bad value stops a service at start with one line naming the variable
(see ``load_settings``).
"""

from __future__ import annotations

import ipaddress
import ssl
import sys
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from warden.matrix.ids import KeyID, ServerName

ENV_PREFIX = "PS_"

# Private, loopback, link-local, CGNAT, multicast, reserved and cloud-metadata ranges,
# for IPv4 and IPv6. Outbound federation never connects there unless allowed.
DEFAULT_DENIED_NETWORKS = (
    "0.0.0.0/8,10.0.0.0/8,100.64.0.0/10,127.0.0.0/8,169.254.0.0/16,172.16.0.0/12,"
    "192.0.0.0/24,192.0.2.0/24,192.168.0.0/16,198.18.0.0/15,198.51.100.0/24,"
    "203.0.113.0/24,224.0.0.0/4,240.0.0.0/4,255.255.255.255/32,"
    "::/128,::1/128,64:ff9b::/96,64:ff9b:1::/48,100::/64,2001:db8::/32,fc00::/7,"
    "fe80::/10,fec0::/10,ff00::/8"
)

CSV = Annotated[list[str], NoDecode]


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


@dataclass(frozen=True)
class NotaryServer:
    """A key notary (``PS_KEY_QUERY_SERVER``): its name and its pinned key."""

    server_name: ServerName
    key_id: KeyID
    verify_key_base64: str


class Settings(BaseSettings):
    """All of Warden's settings. Every service reads the same set."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- Identity and keys (policyserv names) ---
    homeserver_name: str = "localhost"
    homeserver_signing_key_path: str = "./signing.key"
    # policyserv's code default equals the federation key's path outside Docker, which
    # would sign events with the published key; Warden uses a separate file.
    homeserver_event_signing_key_path: str = "./event_signing.key"

    # --- HTTP ---
    http_bind: str = "0.0.0.0:8080"
    http_metrics_bind: str = "0.0.0.0:8081"
    tls_cert_path: str | None = None  # Warden: the gateway terminates TLS when set
    tls_key_path: str | None = None

    # --- Storage and bus ---
    database: str = "postgres://policyserv:devonly@localhost/policyserv?sslmode=disable"
    database_max_open_conns: int = Field(default=10, ge=1)
    database_max_idle_conns: int = Field(default=5, ge=0)
    nats_url: str = "nats://127.0.0.1:4222"  # Warden
    redis_url: str = "redis://127.0.0.1:6379/0"  # Warden

    # --- Federation and keys of other servers ---
    key_query_server: str = "matrix.org,ed25519:a_RXGa,l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ"
    direct_key_fetching: bool = False
    homeserver_allowed_networks: CSV = Field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    homeserver_denied_networks: CSV = Field(
        default_factory=lambda: _split_csv(DEFAULT_DENIED_NETWORKS)
    )
    federation_verify_tls: bool = True  # Warden
    federation_timeout_seconds: float = Field(default=30.0, gt=0)  # Warden
    # Warden: extra CA bundle (PEM) trusted for outbound federation TLS, on top of the
    # system's; for private deployments and tests.
    federation_ca_file: str | None = None
    key_fetch_timeout_seconds: float = Field(default=10.0, gt=0)  # Warden
    key_negative_cache_seconds: int = Field(default=60, ge=0)  # Warden
    trusted_origins: CSV = Field(default_factory=lambda: ["matrix.org", "element.io"])

    # --- Operations (Warden) ---
    log_level: str = "INFO"
    log_content: bool = False  # include event content in debug logs
    shutdown_delay_seconds: float = Field(default=5.0, ge=0)  # readiness 503 before draining
    shutdown_timeout_seconds: float = Field(default=25.0, gt=0)
    startup_timeout_seconds: float = Field(default=60.0, gt=0)  # wait for dependencies
    otel_exporter: str = "none"  # "none" or "console"

    @field_validator(
        "homeserver_allowed_networks",
        "homeserver_denied_networks",
        "trusted_origins",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("homeserver_allowed_networks", "homeserver_denied_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a valid CIDR network ({exc})") from None
        return value

    @field_validator("http_bind", "http_metrics_bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_bind(value)
        return value

    @field_validator("federation_ca_file")
    @classmethod
    def _ca_file(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            ssl.create_default_context().load_verify_locations(cafile=value)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load CA bundle {value!r}: {exc}") from None
        return value

    @field_validator("key_query_server")
    @classmethod
    def _notary(cls, value: str) -> str:
        _parse_notary(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("otel_exporter")
    @classmethod
    def _otel(cls, value: str) -> str:
        if value not in {"none", "console"}:
            raise ValueError("must be 'none' or 'console'")
        return value

    @property
    def server_name(self) -> ServerName:
        """Our own server name, typed."""
        return ServerName(self.homeserver_name)

    @property
    def notary(self) -> NotaryServer | None:
        """The pinned notary, or None when ``PS_KEY_QUERY_SERVER`` is empty."""
        return _parse_notary(self.key_query_server)


def parse_bind(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _parse_notary(value: str) -> NotaryServer | None:
    if not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3 or not all(parts):
        raise ValueError("must be 'server_name,key_id,base64_public_key'")
    name, key_id, key = parts
    if not key_id.startswith("ed25519:"):
        raise ValueError(f"key ID {key_id!r} is not an ed25519 key")
    from warden.matrix.keys import decode_verify_key  # local: keys imports nothing of ours

    decode_verify_key(key_id, key)
    return NotaryServer(ServerName(name), KeyID(key_id), key)


class SettingsError(SystemExit):
    """Raised (as an exit) when a setting is invalid; the message names the variable."""


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment.

    On a bad value, print one line naming the ``PS_`` variable to stderr and exit with
    status 2.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        message = str(err["msg"]).removeprefix("Value error, ")
        line = f"warden: invalid setting {ENV_PREFIX}{field.upper()}: {message}"
        print(line, file=sys.stderr)
        raise SettingsError(2) from None

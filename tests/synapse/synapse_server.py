"""A real Synapse homeserver on loopback, for the end-to-end tests.

``start_synapse`` writes a ``homeserver.yaml`` tuned for tests (see
``/work/shared/reference/synapse-as-client.md`` for why each setting is there) and runs
``python -m synapse.app.homeserver`` with Synapse's own interpreter:

* ``server_name`` is ``127.0.0.1:<federation port>``: an IP literal with a port, so no
  SRV or ``.well-known`` lookup is ever made for it, or by it for Warden's name;
* the federation listener speaks HTTPS with a certificate from the test CA; the client
  listener is plain HTTP;
* it fetches keys directly from each origin (``trusted_key_servers: []``) and does not
  verify federation certificates;
* loopback is removed from ``ip_range_blacklist`` (the federation client checks only the
  blocklist for IP-literal names) and allowlisted;
* every rate limit is raised, users are registered with the shared-secret admin API, and
  the database is SQLite.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme
from signedjson.key import generate_signing_key, write_signing_keys

from tests.service_processes import free_port

# Synapse's DEFAULT_IP_RANGE_BLOCKLIST (synapse/config/server.py) without loopback.
LOOPBACK_RANGES = ["127.0.0.0/8", "::1/128"]
BLOCKLIST_WITHOUT_LOOPBACK = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
]

# Far beyond anything a test does, so no request is ever throttled.
_UNLIMITED = {"per_second": 10000, "burst_count": 100000}
RATE_LIMITS: dict[str, Any] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_3pid_validation": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_profile": _UNLIMITED,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 10000,
        "sleep_delay": 1,
        "reject_limit": 10000,
        "concurrent": 1000,
    },
}

READY_TIMEOUT_SECONDS = 60.0


class SynapseError(RuntimeError):
    """Synapse did not start, or answered a setup request unexpectedly."""


@dataclass
class SynapseUser:
    """A registered account and its access token."""

    user_id: str
    access_token: str
    localpart: str


@dataclass
class SynapseServer:
    """A running Synapse and where to reach it."""

    proc: subprocess.Popen[bytes]
    server_name: str
    client_url: str
    federation_url: str
    workdir: Path
    shared_secret: str
    users: dict[str, SynapseUser] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        """Synapse's own log file (INFO and up, Synapse's format)."""
        return self.workdir / "homeserver.log"

    def log(self) -> str:
        """Everything Synapse logged so far (and printed: start-up errors go there)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        console = self.workdir / "console.log"
        if console.exists():
            text += "\n--- console ---\n" + console.read_text(errors="replace")
        return text

    def log_lines(self, *needles: str) -> list[str]:
        """Log lines holding every one of ``needles``."""
        return [
            line for line in self.log().splitlines() if all(needle in line for needle in needles)
        ]

    def stop(self) -> int:
        """SIGTERM, wait (kill after 30 s); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def register(self, localpart: str, *, admin: bool = False) -> SynapseUser:
        """Register ``localpart`` through the shared-secret admin API (HMAC-SHA1 nonce flow)."""
        url = f"{self.client_url}/_synapse/admin/v1/register"
        nonce = httpx.get(url, timeout=10).json()["nonce"]
        password = secrets.token_urlsafe(16)
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode()]))
        mac.update(b"\x00admin" if admin else b"\x00notadmin")
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        response = httpx.post(url, json=body, timeout=10)
        if response.status_code != 200:
            raise SynapseError(f"registering {localpart}: {response.status_code} {response.text}")
        data = response.json()
        user = SynapseUser(data["user_id"], data["access_token"], localpart)
        self.users[localpart] = user
        return user

    def user_id(self, localpart: str) -> str:
        """``@localpart:<server name>``."""
        return f"@{localpart}:{self.server_name}"


def _homeserver_config(
    workdir: Path, server_name: str, fed_port: int, client_port: int, shared_secret: str
) -> dict[str, Any]:
    return {
        "server_name": server_name,
        "pid_file": str(workdir / "homeserver.pid"),
        "public_baseurl": f"http://127.0.0.1:{client_port}/",
        "listeners": [
            {
                "port": fed_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "x_forwarded": False,
                "resources": [{"names": ["federation"], "compress": False}],
            },
            {
                "port": client_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            },
        ],
        "tls_certificate_path": str(workdir / "tls.crt"),
        "tls_private_key_path": str(workdir / "tls.key"),
        "database": {"name": "sqlite3", "args": {"database": str(workdir / "homeserver.db")}},
        "log_config": str(workdir / "log.yaml"),
        "media_store_path": str(workdir / "media_store"),
        "signing_key_path": str(workdir / "signing.key"),
        "report_stats": False,
        "enable_metrics": False,
        "enable_registration": False,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_verify_certificates": False,
        "ip_range_blacklist": BLOCKLIST_WITHOUT_LOOPBACK,
        "ip_range_whitelist": LOOPBACK_RANGES,
        "room_list_publication_rules": [{"action": "allow"}],
        "allow_public_rooms_over_federation": True,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "user_directory": {"enabled": False},
        "require_auth_for_profile_requests": False,
        **RATE_LIMITS,
    }


def _log_config(workdir: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s"
                " - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(workdir / "homeserver.log"),
                "encoding": "utf8",
            }
        },
        "loggers": {
            "synapse.storage.SQL": {"level": "WARNING"},
            "synapse.access.http": {"level": "INFO"},
        },
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def start_synapse(
    python: Path,
    workdir: Path,
    ca: trustme.CA,
    *,
    modules: list[dict[str, Any]] | None = None,
    extra_env: dict[str, str] | None = None,
) -> SynapseServer:
    """Configure and start Synapse under ``workdir``; return once its client API answers.

    ``modules`` is ``homeserver.yaml``'s ``modules`` list; ``extra_env`` is added to
    Synapse's environment.

    The federation certificate is issued by ``ca`` for ``127.0.0.1``. Raises
    ``SynapseError`` (with Synapse's output) when it exits or does not answer in time.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    fed_port, client_port = free_port(), free_port()
    server_name = f"127.0.0.1:{fed_port}"
    shared_secret = secrets.token_urlsafe(24)

    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(workdir / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(workdir / "tls.key"))
    with open(workdir / "signing.key", "w") as key_file:
        write_signing_keys(key_file, [generate_signing_key("a_" + secrets.token_hex(2))])
    # JSON is YAML: no YAML writer needed.
    (workdir / "log.yaml").write_text(json.dumps(_log_config(workdir), indent=1))
    config_path = workdir / "homeserver.yaml"
    config = _homeserver_config(workdir, server_name, fed_port, client_port, shared_secret)
    if modules:
        config["modules"] = modules
    config_path.write_text(json.dumps(config, indent=1))

    with open(workdir / "console.log", "wb") as console:
        proc = subprocess.Popen(
            [str(python), "-m", "synapse.app.homeserver", "-c", str(config_path)],
            cwd=workdir,
            stdout=console,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(extra_env or {})},
        )
    server = SynapseServer(
        proc,
        server_name,
        f"http://127.0.0.1:{client_port}",
        f"https://127.0.0.1:{fed_port}",
        workdir,
        shared_secret,
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SynapseError(f"Synapse exited with {proc.returncode}:\n{server.log()}")
        try:
            response = httpx.get(f"{server.client_url}/_matrix/client/versions", timeout=2)
            if response.status_code == 200:
                return server
            last = f"{response.status_code} {response.text}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    server.stop()
    raise SynapseError(
        f"Synapse not ready after {READY_TIMEOUT_SECONDS}s ({last}):\n{server.log()}"
    )

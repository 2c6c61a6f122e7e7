"""A whole Warden stack as real processes, reachable by Synapse over HTTPS.

The gateway terminates TLS itself (``PS_TLS_CERT_PATH``/``PS_TLS_KEY_PATH``, a
certificate from the test CA for ``127.0.0.1``) and is named ``127.0.0.1:<port>``, so
Synapse reaches it at that IP literal with no lookup. Warden reaches Synapse the same way:
the test CA is its ``PS_FEDERATION_CA_FILE``, keys are fetched directly from each server,
loopback is removed from its deny list, and ``PS_JOIN_SERVER`` is Synapse's name. The
moderator redacts through a Synapse account given in ``PS_MODERATOR_ACCESS_TOKENS``.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme

from tests.conftest import NATS_URL, REDIS_URL
from tests.service_processes import ServiceProcess, free_port
from tests.synapse.synapse_client import q
from warden.matrix.keys import SigningKey, write_new_key
from warden.settings import DEFAULT_DENIED_NETWORKS

DENIED_WITHOUT_LOOPBACK = ",".join(
    n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}
)


@dataclass
class WardenStack:
    """The running services and what a test needs to talk to them."""

    name: str
    url: str
    api_key: str
    federation_key: SigningKey
    policy_key: SigningKey
    ca_file: str
    services: list[ServiceProcess] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        """Warden's own user, ``@policyserv:<name>``."""
        return f"@policyserv:{self.name}"

    def admin_client(self) -> httpx.AsyncClient:
        """An HTTPS client for the admin API, with the API key."""
        return httpx.AsyncClient(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {self.api_key}"},
            verify=ssl.create_default_context(cafile=self.ca_file),
            timeout=httpx.Timeout(120.0),
        )

    def public_client(self) -> httpx.AsyncClient:
        """An HTTPS client for the unauthenticated endpoints (well-knowns)."""
        return httpx.AsyncClient(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=self.ca_file),
            timeout=httpx.Timeout(30.0),
        )

    def logs(self) -> str:
        """Every service's output so far, each section headed by its name."""
        return "\n".join(f"--- {s.name} ---\n{s.output()}" for s in self.services)

    def log_lines(self, *needles: str) -> list[str]:
        """Service log lines holding every one of ``needles``."""
        return [
            line
            for service in self.services
            for line in service.output().splitlines()
            if all(needle in line for needle in needles)
        ]

    def stop(self) -> dict[str, int]:
        """SIGTERM every service (moderator and workers first, the gateway last)."""
        codes: dict[str, int] = {}
        for service in reversed(self.services):
            try:
                codes[service.name] = service.stop()
            except subprocess.TimeoutExpired:
                service.proc.kill()
                codes[service.name] = service.proc.wait()
        return codes


def start_warden(
    workdir: Path,
    *,
    database_url: str,
    ca: trustme.CA,
    ca_file: str,
    join_server: str,
    moderator_tokens: str,
    filter_workers: int = 1,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
) -> WardenStack:
    """Start gateway, filter workers and moderator; return once each is ready.

    ``moderator_tokens`` is ``PS_MODERATOR_ACCESS_TOKENS``. ``extra_env`` overrides any
    variable (filter defaults, say). ``port`` is the gateway's (a free one when None).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    name = f"127.0.0.1:{port}"
    fed_path, pol_path = workdir / "signing.key", workdir / "event_signing.key"
    federation_key, policy_key = write_new_key(fed_path), write_new_key(pol_path)
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = workdir / "gateway.pem", workdir / "gateway.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    api_key = secrets.token_urlsafe(24)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(
        PS_DATABASE=database_url,
        PS_REDIS_URL=REDIS_URL,
        PS_NATS_URL=NATS_URL,
        PS_HOMESERVER_NAME=name,
        PS_HOMESERVER_SIGNING_KEY_PATH=str(fed_path),
        PS_HOMESERVER_EVENT_SIGNING_KEY_PATH=str(pol_path),
        PS_TLS_CERT_PATH=str(cert),
        PS_TLS_KEY_PATH=str(key),
        PS_FEDERATION_CA_FILE=ca_file,
        PS_DIRECT_KEY_FETCHING="true",
        PS_KEY_QUERY_SERVER="",
        PS_HOMESERVER_DENIED_NETWORKS=DENIED_WITHOUT_LOOPBACK,
        PS_JOIN_SERVER=join_server,
        PS_TRUSTED_ORIGINS=join_server,
        PS_API_KEY=api_key,
        PS_MODERATOR_ACCESS_TOKENS=moderator_tokens,
        PS_MODERATION_RETRY_BASE_SECONDS="0.5",
        PS_SHUTDOWN_DELAY_SECONDS="0",
        PS_STARTUP_TIMEOUT_SECONDS="20",
        PS_LOG_LEVEL="INFO",
    )
    env.update(extra_env or {})

    stack = WardenStack(name, f"https://{name}", api_key, federation_key, policy_key, ca_file)
    plan = [("gateway", port)] + [("filter-worker", None)] * filter_workers + [("moderator", None)]
    for index, (service, api_port) in enumerate(plan):
        metrics_bind = f"127.0.0.1:{free_port()}"
        service_env = {**env, "PS_HTTP_METRICS_BIND": metrics_bind}
        if api_port is not None:
            service_env["PS_HTTP_BIND"] = f"127.0.0.1:{api_port}"
        log_path = workdir / f"{service}-{index}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "warden", service],
                env=service_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack.services.append(
            ServiceProcess(
                service,
                proc,
                f"http://{metrics_bind}",
                api_url=stack.url if api_port is not None else None,
                log_path=log_path,
            )
        )
    try:
        for service_process in stack.services:
            service_process.wait_ready(timeout=60)
    except BaseException:
        stack.stop()
        raise
    return stack


async def room_report(stack: WardenStack, room_id: str) -> dict[str, Any] | None:
    """``GET /api/v1/rooms/{roomId}``, or None when Warden does not protect the room."""
    async with stack.admin_client() as admin:
        response = await admin.get(f"/rooms/{q(room_id)}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    data: dict[str, Any] = response.json()
    return data


async def verdict_of(stack: WardenStack, event_id: str) -> dict[str, Any] | None:
    """``GET /api/v1/events/{eventId}``: Warden's stored verdict, or None."""
    async with stack.admin_client() as admin:
        response = await admin.get(f"/events/{q(event_id)}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    data: dict[str, Any] = response.json()
    return data

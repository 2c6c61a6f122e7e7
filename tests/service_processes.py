"""Run Warden services as real child processes against the test PostgreSQL/Redis/NATS."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import NATS_URL, REDIS_URL


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    """A running ``warden <service>`` child and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    metrics_url: str
    api_url: str | None = None
    log_path: Path = field(default_factory=Path)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /readyz until 200; fail with the child's output if it dies or times out."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(f"{self.metrics_url}/readyz", timeout=2)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.1)
        pytest.fail(f"{self.name} not ready after {timeout}s ({last}):\n{self.output()}")

    def output(self) -> str:
        """Everything the child printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def key_paths(tmp_path: Path) -> tuple[Path, Path]:
    """Two freshly generated key files (federation, policy)."""
    fed, pol = tmp_path / "signing.key", tmp_path / "event_signing.key"
    env = {
        **os.environ,
        "PS_HOMESERVER_SIGNING_KEY_PATH": str(fed),
        "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(pol),
    }
    subprocess.run(
        [sys.executable, "-m", "warden", "keygen"], env=env, check=True, capture_output=True
    )
    return fed, pol


@pytest.fixture
def service_env(pg_database: str, key_paths: tuple[Path, Path]) -> dict[str, str]:
    """Environment for a child service pointing at the test services."""
    fed, pol = key_paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(
        PS_DATABASE=pg_database,
        PS_REDIS_URL=REDIS_URL,
        PS_NATS_URL=NATS_URL,
        PS_HOMESERVER_NAME="warden.test",
        PS_HOMESERVER_SIGNING_KEY_PATH=str(fed),
        PS_HOMESERVER_EVENT_SIGNING_KEY_PATH=str(pol),
        PS_SHUTDOWN_DELAY_SECONDS="0",
        PS_STARTUP_TIMEOUT_SECONDS="10",
    )
    return env


@pytest.fixture
def spawn_service(
    tmp_path: Path, service_env: dict[str, str]
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``warden <name>`` with extra env; every child is killed at teardown."""
    children: list[ServiceProcess] = []

    def spawn(name: str, **env: str) -> ServiceProcess:
        metrics_port, api_port = free_port(), free_port()
        full_env = {
            **service_env,
            "PS_HTTP_METRICS_BIND": f"127.0.0.1:{metrics_port}",
            "PS_HTTP_BIND": f"127.0.0.1:{api_port}",
            **env,
        }
        log_path = tmp_path / f"{name}-{len(children)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "warden", name],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        metrics_bind = full_env["PS_HTTP_METRICS_BIND"]
        api_bind = full_env["PS_HTTP_BIND"]
        sp = ServiceProcess(
            name,
            proc,
            f"http://{metrics_bind}",
            api_url=f"http://{api_bind}" if name == "gateway" else None,
            log_path=log_path,
        )
        children.append(sp)
        return sp

    yield spawn
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()

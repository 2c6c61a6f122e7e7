"""The services under test: two gateways, two filter workers, the moderator and the
webhooks service, as real ``warden <service>`` processes under ``warden dev``'s
:class:`~warden.dev.supervisor.Supervisor`, which restarts whichever one dies (the
suite SIGKILLs them). Their output goes to one log file, each line prefixed with the
child's name.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from warden.dev.procs import free_port
from warden.dev.supervisor import ChildSpec, Output, RestartPolicy, Supervisor

GATEWAYS = ("gateway-a", "gateway-b")
WORKERS = ("worker-a", "worker-b")
SERVICES = (*GATEWAYS, *WORKERS, "moderator", "webhooks")
COMMANDS = {
    "gateway-a": "gateway",
    "gateway-b": "gateway",
    "worker-a": "filter-worker",
    "worker-b": "filter-worker",
    "moderator": "moderator",
    "webhooks": "webhooks",
}
# Every kill is followed by a restart; the suite kills each child a few times a minute
# at most, so the supervisor must not give up on that (a real crash loop still ends it).
POLICY = RestartPolicy(max_restarts=20, window_seconds=60, backoff_initial=0.2, backoff_max=2)


@dataclass
class FaultStack:
    """The supervised children and where they listen."""

    supervisor: Supervisor
    api_urls: dict[str, str]  # gateway name -> http://host:port
    metrics_urls: dict[str, str]  # child name -> http://host:port
    log: IO[str]
    log_path: Path

    @classmethod
    def start(cls, env: Mapping[str, str], per_service: Mapping[str, Mapping[str, str]],
              log_path: Path) -> FaultStack:  # fmt: skip
        """Start the six children with ``env`` plus ``per_service[command]``."""
        specs, api_urls, metrics_urls = [], {}, {}
        for name in SERVICES:
            command = COMMANDS[name]
            metrics = f"127.0.0.1:{free_port()}"
            extra = {"PS_HTTP_METRICS_BIND": metrics, **per_service.get(command, {})}
            if command == "gateway":
                api = f"127.0.0.1:{free_port()}"
                extra["PS_HTTP_BIND"] = api
                api_urls[name] = f"http://{api}"
            metrics_urls[name] = f"http://{metrics}"
            specs.append(
                ChildSpec(
                    name=name,
                    argv=(sys.executable, "-m", "warden", command),
                    env={**env, **extra},
                    ready_url=f"http://{metrics}/readyz",
                    live_url=f"http://{metrics}/livez",
                )
            )
        log = log_path.open("a", buffering=1)
        supervisor = Supervisor(
            specs, policy=POLICY, stop_timeout=10, out=Output(log, color=False),
            ready_poll_interval=0.1,
        )  # fmt: skip
        supervisor.start()
        return cls(supervisor, api_urls, metrics_urls, log, log_path)

    def pid(self, name: str) -> int | None:
        """The pid of child ``name``'s current process (None while it is down)."""
        return self.supervisor.pids().get(name)

    async def ready(self, client: httpx.AsyncClient) -> dict[str, int]:
        """Each child's /readyz status (0 when it does not answer)."""
        statuses = {}
        for name, url in self.metrics_urls.items():
            try:
                statuses[name] = (await client.get(f"{url}/readyz", timeout=2)).status_code
            except httpx.HTTPError:
                statuses[name] = 0
        return statuses

    def tail(self, lines: int = 60) -> str:
        """The end of the children's output (for failure messages)."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def exits_of(self, name: str, lines: int = 20) -> str:
        """What explains child ``name``'s exits, for failure messages (the tail of the
        whole output seldom reaches back to an exit): its ERROR and CRITICAL log lines,
        anything it wrote that is not a JSON log line (an uncaught traceback), and the
        supervisor's lines about it; the last ``lines`` of them."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            source, _, text = line.partition(" | ")
            source = source.strip()
            if source == name:
                if not text.startswith("{") or any(
                    f'"level": "{level}"' in text for level in ("ERROR", "CRITICAL")
                ):
                    found.append(line)
            elif source == "dev" and text.startswith(f"{name} "):
                found.append(line)
        return "\n".join(line[:3000] for line in found[-lines:])

    async def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after the grace)."""
        await self.supervisor.stop()
        self.log.close()

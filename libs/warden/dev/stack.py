"""``warden dev``: the whole stack on one machine with one command.

Steps: make sure NATS, Redis and PostgreSQL answer (starting embedded ones under
``.warden/`` when they do not, see :mod:`warden.dev.embedded`), apply migrations
(``warden migrate``), create the signing keys if missing (``warden keygen``), start the
four services under a :class:`~warden.dev.supervisor.Supervisor`, wait until each one's
``/readyz`` answers 200 and print where the gateway listens. Ctrl-C, SIGTERM or SIGHUP
stops the services (each gets ``PS_DEV_STOP_GRACE_SECONDS`` after SIGTERM, then SIGKILL),
then the embedded servers, and exits 0; a second Ctrl-C kills the services at once. If
``warden dev`` itself is killed, the services are killed with it (parent-death signal).
A service that crash-loops (see the supervisor's restart policy) stops everything with
exit status 1.

Dev-only knobs are ``PS_DEV_*`` variables (:class:`DevSettings`). Defaults differ from
production, each only when the user did not set the variable: the gateway binds
127.0.0.1 (not 0.0.0.0); the key files live in ``.warden/keys/``;
``PS_SHUTDOWN_DELAY_SECONDS`` is 0 (no load balancer needs time to notice); the admin API
is on with a random key kept in ``.warden/api_key``; and origins on 127.0.0.1 are trusted
(direct key fetching, loopback allowed, federation TLS not verified) so that
``warden sign-request`` can play a homeserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shlex
import shutil
import signal
import sys
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from warden.dev.embedded import EmbeddedError, Servers, ensure_servers
from warden.dev.procs import port_is_free
from warden.dev.supervisor import ChildSpec, Output, RestartPolicy, Supervisor, run_once
from warden.settings import DEFAULT_DENIED_NETWORKS, Settings, local_url, parse_bind

T = TypeVar("T")

SERVICES = ("gateway", "filter-worker", "moderator", "webhooks")
DEV_GATEWAY_BIND = "127.0.0.1:8080"
DEV_GATEWAY_METRICS_BIND = "127.0.0.1:8081"


class DevSettings(BaseSettings):
    """Knobs of ``warden dev`` only (``PS_DEV_*``); the services never read these."""

    model_config = SettingsConfigDict(env_prefix="PS_DEV_", extra="ignore", frozen=True)

    dir: str = ".warden"  # embedded servers' data and the dev keys
    # The command that runs Warden's CLI; empty means this interpreter's `-m warden`
    # (or the `warden` script next to it). Tests point it at a stand-in.
    command: str = ""
    filter_worker_metrics_bind: str = "127.0.0.1:8083"
    moderator_metrics_bind: str = "127.0.0.1:8084"
    webhooks_metrics_bind: str = "127.0.0.1:8085"
    ready_timeout_seconds: float = Field(default=90.0, gt=0)
    max_restarts: int = Field(default=5, ge=0)
    restart_window_seconds: float = Field(default=60.0, gt=0)
    restart_backoff_seconds: float = Field(default=0.5, gt=0)
    # How long a service may take to exit after SIGTERM before it is killed (a wedged
    # one never exits by itself). Services drain within PS_SHUTDOWN_TIMEOUT_SECONDS;
    # in dev nothing is lost by cutting a drain short (JetStream redelivers).
    stop_grace_seconds: float = Field(default=10.0, gt=0)

    def base_dir(self) -> Path:
        """The absolute data directory (children may run with another working directory)."""
        return Path(self.dir).resolve()


class DevError(Exception):
    """A problem the user can fix; printed as one message, exit status 1."""


def warden_command(dev: DevSettings) -> list[str]:
    """The argv prefix that runs Warden's CLI in a child process."""
    if dev.command.strip():
        return shlex.split(dev.command)
    if importlib.util.find_spec("warden.__main__") is not None:
        return [sys.executable, "-m", "warden"]
    script = Path(sys.executable).parent / "warden"
    if script.exists():
        return [str(script)]
    found = shutil.which("warden")
    if found is not None:
        return [found]
    raise DevError("cannot find the `warden` command; run `make venv`")


@dataclass(frozen=True)
class Plan:
    """What the stack will run: the shared environment and each service's binds."""

    env: dict[str, str]
    binds: dict[str, dict[str, str]]  # service -> extra PS_* variables
    keys: tuple[Path, Path]

    def specs(self, command: list[str]) -> list[ChildSpec]:
        """The supervisor's child specs, in start order."""
        return [
            ChildSpec(
                name=name,
                argv=(*command, name),
                env={**self.env, **extra},
                ready_url=local_url(extra["PS_HTTP_METRICS_BIND"]) + "/readyz",
                live_url=local_url(extra["PS_HTTP_METRICS_BIND"]) + "/livez",
            )
            for name, extra in self.binds.items()
        ]


def make_plan(settings: Settings, dev: DevSettings, base_dir: Path) -> Plan:
    """Work out binds, key paths and the environment before anything is started."""
    explicit = settings.model_fields_set
    binds = {
        "gateway": {
            "PS_HTTP_BIND": settings.http_bind if "http_bind" in explicit else DEV_GATEWAY_BIND,
            "PS_HTTP_METRICS_BIND": settings.http_metrics_bind
            if "http_metrics_bind" in explicit
            else DEV_GATEWAY_METRICS_BIND,
        },
        "filter-worker": {"PS_HTTP_METRICS_BIND": dev.filter_worker_metrics_bind},
        "moderator": {"PS_HTTP_METRICS_BIND": dev.moderator_metrics_bind},
        "webhooks": {"PS_HTTP_METRICS_BIND": dev.webhooks_metrics_bind},
    }
    keys_dir = base_dir / "keys"
    signing = (
        Path(settings.homeserver_signing_key_path)
        if "homeserver_signing_key_path" in explicit
        else keys_dir / "signing.key"
    )
    event_signing = (
        Path(settings.homeserver_event_signing_key_path)
        if "homeserver_event_signing_key_path" in explicit
        else keys_dir / "event_signing.key"
    )
    env = dict(os.environ)
    env.update(
        {
            "PS_HOMESERVER_SIGNING_KEY_PATH": str(signing),
            "PS_HOMESERVER_EVENT_SIGNING_KEY_PATH": str(event_signing),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if "shutdown_delay_seconds" not in explicit:
        env["PS_SHUTDOWN_DELAY_SECONDS"] = "0"
    for field, var, value in _local_trust_defaults():
        if field not in explicit:
            env[var] = value
    if "api_key" not in explicit:
        env["PS_API_KEY"] = dev_api_key(base_dir)
    return Plan(env=env, binds=binds, keys=(signing, event_signing))


def _local_trust_defaults() -> list[tuple[str, str, str]]:
    """(settings field, variable, value): what lets origins on this machine be tried out.

    ``warden sign-request`` plays an origin homeserver on 127.0.0.1 with a throwaway
    self-signed certificate, so the dev stack fetches keys directly, trusts loopback and
    does not verify federation TLS. Never use these in production.
    """
    denied = ",".join(
        n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}
    )
    return [
        ("direct_key_fetching", "PS_DIRECT_KEY_FETCHING", "true"),
        ("federation_verify_tls", "PS_FEDERATION_VERIFY_TLS", "false"),
        ("key_query_server", "PS_KEY_QUERY_SERVER", ""),
        ("homeserver_denied_networks", "PS_HOMESERVER_DENIED_NETWORKS", denied),
    ]


def dev_api_key(base_dir: Path) -> str:
    """The dev stack's admin API key: random, kept in ``<PS_DEV_DIR>/api_key`` (0600)."""
    path = base_dir / "api_key"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _check_ports(plan: Plan) -> None:
    seen: dict[str, str] = {}
    for name, extra in plan.binds.items():
        for var, bind in extra.items():
            where = f"{name} {var}"
            if bind in seen:
                raise DevError(f"{where} and {seen[bind]} are both {bind}")
            seen[bind] = where
            host, port = parse_bind(bind)
            if not port_is_free(host, port):
                raise DevError(
                    f"{bind} ({where}) is already in use; is another `warden dev` running? "
                    "Stop it or choose another address (PS_HTTP_BIND, PS_HTTP_METRICS_BIND, "
                    "PS_DEV_<SERVICE>_METRICS_BIND)."
                )


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await ``awaitable`` unless ``stop`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _step(
    name: str, argv: list[str], env: Mapping[str, str], out: Output, stop: asyncio.Event
) -> bool:
    """Run a one-shot step; False when interrupted. A failure raises DevError."""
    status = await run_once(name, argv, env, out, stop)
    if status is None:
        return False
    if status != 0:
        raise DevError(f"`{shlex.join(argv)}` failed with status {status}")
    return True


async def run_stack(settings: Settings, dev: DevSettings, out: Output) -> int:
    """The body of ``warden dev``; see the module docstring."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    supervisor: Supervisor | None = None
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            out.line("dev", "stopping (Ctrl-C again to kill)")
        elif supervisor is not None:
            supervisor.kill()
        stop.set()

    # SIGHUP too: a closed terminal must stop the services, not orphan them.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal)

    base_dir = dev.base_dir()
    servers: Servers | None = None
    try:
        plan = make_plan(settings, dev, base_dir)
        _check_ports(plan)
        command = warden_command(dev)
        base_dir.mkdir(parents=True, exist_ok=True)

        servers = await _unless_stopped(
            ensure_servers(
                settings.nats_url,
                settings.redis_url,
                settings.database,
                base_dir,
                database_explicit="database" in settings.model_fields_set,
                log=lambda text: out.line("dev", text),
            ),
            stop,
        )
        if servers is None:
            return 0
        env = {
            **plan.env,
            "PS_NATS_URL": servers.url("nats"),
            "PS_REDIS_URL": servers.url("redis"),
            "PS_DATABASE": servers.url("postgres"),
        }

        if not await _step("migrate", [*command, "migrate"], env, out, stop):
            return 0
        if not all(path.exists() for path in plan.keys):
            for path in plan.keys:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not await _step("keygen", [*command, "keygen"], env, out, stop):
                return 0

        plan = Plan(env=env, binds=plan.binds, keys=plan.keys)
        supervisor = Supervisor(
            plan.specs(command),
            policy=RestartPolicy(
                max_restarts=dev.max_restarts,
                window_seconds=dev.restart_window_seconds,
                backoff_initial=dev.restart_backoff_seconds,
            ),
            stop_timeout=dev.stop_grace_seconds,
            out=out,
        )
        supervisor.start()
        waiting = await _unless_stopped(supervisor.wait_ready(dev.ready_timeout_seconds), stop)
        if waiting is None:
            return 0
        if waiting:
            reason = supervisor.failure or (
                f"not ready after {dev.ready_timeout_seconds:.0f}s: {', '.join(waiting)}"
            )
            raise DevError(reason)

        gateway = local_url(plan.binds["gateway"]["PS_HTTP_BIND"])
        out.line("dev", f"Warden is ready: gateway at {gateway}")
        out.line("dev", f"  server keys: {gateway}/_matrix/key/v2/server")
        metrics = ", ".join(
            f"{name} {local_url(extra['PS_HTTP_METRICS_BIND'])}/metrics"
            for name, extra in plan.binds.items()
        )
        out.line("dev", f"  metrics: {metrics}")
        out.line("dev", f"  admin API key: in {base_dir / 'api_key'} (Authorization: Bearer ...)")
        out.line("dev", "  origins on 127.0.0.1 are trusted (dev only): try `warden sign-request`")
        out.line("dev", "  press Ctrl-C to stop")

        failed = asyncio.create_task(supervisor.failed.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        stopped.cancel()
        if supervisor.failed.is_set() and not stop.is_set():
            raise DevError(supervisor.failure or "a service failed")
        return 0
    except (DevError, EmbeddedError) as exc:
        out.line("dev", f"error: {exc}")
        return 1
    finally:
        if supervisor is not None:
            out.line("dev", "stopping services")
            await supervisor.stop()
        if servers is not None and any(h.embedded for h in servers.handles):
            out.line("dev", "stopping embedded servers")
            servers.stop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        out.line("dev", "stopped")


def run_dev(settings: Settings, dev: DevSettings | None = None) -> int:
    """Entry point for ``warden dev``: run the stack in the foreground, return exit status."""
    return asyncio.run(run_stack(settings, dev or DevSettings(), Output()))

"""The processes under test, their dependencies, and where their CPU time goes.

* ``Servers``: PostgreSQL at the configured URL (a fresh database per run, dropped at
  the end), and by default a private Redis and a private NATS started for the run.
  Private, because Warden's NATS subjects and queue group are fixed: any other Warden
  filter worker on a shared NATS (a developer's ``make run``, a test session) would
  join our queue group and answer our evaluations from its own database; and so that
  the CPU they use is ours alone. The machine's ``redis-server`` and ``nats-server``
  are used when on PATH, else the ``embedded`` extra's. ``BENCH_SERVERS=shared`` uses
  the configured Redis and NATS instead. Whatever does not answer is replaced by the
  embedded servers of ``warden dev`` (``warden.dev.embedded.ensure_servers``).
* ``Proc``: a child process (``warden gateway``, ``warden filter-worker``, a floor, the
  key server) with its output in a log file; it dies with the harness.
* ``cpu_seconds`` and ``CpuSnapshot``: user + system time from ``/proc/<pid>/stat``,
  per service process and for the machine's PostgreSQL, Redis and NATS processes.
* ``memory_mib``: resident memory of the same processes (the attack window reports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from warden.dev.procs import death_signal_preexec, free_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Processes of the shared servers, found by command name.
SERVER_COMMANDS = {"postgres": "postgresql", "redis-server": "redis", "nats-server": "nats"}
_CLIENT_BACKEND = re.compile(r"\S+\(\d+\)")


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); the split starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def server_pids(database: str, kinds: Iterable[str]) -> dict[str, list[int]]:
    """Pids of the machine's server processes of ``kinds``, by server.

    For PostgreSQL: the server's own processes (postmaster, WAL writer, checkpointer,
    autovacuum...) and the client backends of ``database``, not other databases'.
    """
    wanted = set(kinds)
    found: dict[str, list[int]] = {name: [] for name in wanted}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        name = SERVER_COMMANDS.get(_command_name(pid))
        if name is None or name not in wanted:
            continue
        if name == "postgresql":
            cmdline = _cmdline(pid)
            # Client backends show "user database host(port) state".
            if _CLIENT_BACKEND.search(cmdline) and f" {database} " not in cmdline:
                continue
        found[name].append(pid)
    return found


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def _pss_kib(pid: int) -> int | None:
    """Proportional set size (shared pages split between their processes)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return _status_kib(pid, "VmRSS")
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return _status_kib(pid, "VmRSS")


def memory_mib(
    processes: Mapping[str, int], database: str, shared: Iterable[str]
) -> dict[str, float]:
    """Resident memory in MiB: each of ``processes`` (name -> pid) by its RSS, and each
    of the machine's ``shared`` servers as the sum of its processes' PSS (PostgreSQL:
    the server's own processes and ``database``'s backends; PSS, because its processes
    share the buffer cache and summing their RSS would count it many times). A process
    that is gone is left out."""
    out: dict[str, float] = {}
    for name, pid in processes.items():
        kib = _status_kib(pid, "VmRSS")
        if kib is not None:
            out[name] = round(kib / 1024, 1)
    for server, pids in server_pids(database, shared).items():
        sizes = [k for k in (_pss_kib(pid) for pid in pids) if k is not None]
        if sizes:
            out[server] = round(sum(sizes) / 1024, 1)
    return out


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, stolen) jiffies of the whole machine from /proc/stat (stolen: time
    the hypervisor gave this machine's CPUs to others, counted in busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    steal = values[7] if len(values) > 7 else 0
    return float(total - idle), float(total), float(steal)


@dataclass
class CpuSnapshot:
    """CPU seconds per named process (or group of processes) at one moment."""

    per_pid: dict[int, float]
    names: dict[int, str]
    machine: tuple[float, float, float]
    at: float

    @classmethod
    def take(
        cls, processes: Mapping[str, int], database: str, shared: Iterable[str]
    ) -> CpuSnapshot:
        """Snapshot ``processes`` (name -> pid) and the machine's ``shared`` servers
        (``postgresql``, ``redis``, ``nats``; PostgreSQL for ``database`` only)."""
        names = {pid: name for name, pid in processes.items()}
        for server, pids in server_pids(database, shared).items():
            for pid in pids:
                names.setdefault(pid, server)
        per_pid = {}
        for pid in names:
            value = cpu_seconds(pid)
            if value is not None:
                per_pid[pid] = value
        return cls(per_pid, names, machine_cpu(), time.monotonic())

    def since(self, before: CpuSnapshot) -> dict[str, float]:
        """CPU seconds used per name between ``before`` and this snapshot.

        Processes that appeared in between (new PostgreSQL backends) count from zero.
        """
        used: dict[str, float] = {}
        for pid, now in self.per_pid.items():
            name = self.names[pid]
            used[name] = used.get(name, 0.0) + now - before.per_pid.get(pid, 0.0)
        return used

    def machine_busy_seconds(self, before: CpuSnapshot) -> float:
        """CPU seconds all CPUs were busy between ``before`` and now (any process,
        interrupts included)."""
        return (self.machine[0] - before.machine[0]) / CLOCK_TICKS

    def machine_steal_share(self, before: CpuSnapshot) -> float:
        """Share of all CPUs' time stolen by the hypervisor between ``before`` and now."""
        total = self.machine[1] - before.machine[1]
        return (self.machine[2] - before.machine[2]) / total if total > 0 else 0.0

    def machine_busy_share(self, before: CpuSnapshot) -> float:
        """Share of all CPUs busy between ``before`` and now (0..1)."""
        busy = self.machine[0] - before.machine[0]
        total = self.machine[1] - before.machine[1]
        return busy / total if total > 0 else 0.0


@dataclass
class Proc:
    """A child process started by the harness."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str = ""
    api_url: str = ""
    api_bind: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """What the child printed so far (the end of it)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Poll ``/readyz`` on the metrics listener until 200."""
        deadline = time.monotonic() + timeout
        last = ""
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited with {self.popen.returncode}:\n{self.output()}"
                    )
                try:
                    r = await client.get(f"{self.metrics_url}/readyz")
                    if r.status_code == 200:
                        return
                    last = r.text
                except httpx.HTTPError as exc:
                    last = str(exc)
                await asyncio.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout}s ({last}):\n{self.output()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(
    name: str,
    argv: list[str],
    env: Mapping[str, str],
    log_dir: Path,
    *,
    with_listeners: bool = True,
    stdout: int | None = None,
) -> Proc:
    """Start ``argv`` as ``name`` with ``env``; listeners on fresh loopback ports."""
    full_env = dict(env)
    metrics_bind = api_bind = ""
    if with_listeners:
        metrics_bind = f"127.0.0.1:{free_port()}"
        api_bind = f"127.0.0.1:{free_port()}"
        full_env.setdefault("PS_HTTP_METRICS_BIND", metrics_bind)
        full_env.setdefault("PS_HTTP_BIND", api_bind)
        metrics_bind, api_bind = full_env["PS_HTTP_METRICS_BIND"], full_env["PS_HTTP_BIND"]
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(  # noqa: S603 (our own commands)
            argv,
            env=full_env,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            preexec_fn=death_signal_preexec(signal.SIGTERM),
        )
    return Proc(
        name,
        popen,
        log_path,
        metrics_url=f"http://{metrics_bind}" if metrics_bind else "",
        api_url=f"http://{api_bind}" if api_bind else "",
        api_bind=api_bind,
    )


def warden_argv(service: str) -> list[str]:
    """The command line of one Warden service."""
    return [sys.executable, "-m", "warden", service]


@dataclass
class Servers:
    """Where PostgreSQL (admin and bench database), Redis and NATS are."""

    pg_admin: str
    redis_url: str
    nats_url: str
    database: str = ""
    embedded: list[str] = field(default_factory=list)
    # Servers started for this run: name ("redis", "nats") -> process.
    private: dict[str, Proc] = field(default_factory=dict)
    _handles: object | None = None

    @property
    def shared(self) -> list[str]:
        """The servers whose processes are the machine's (found by name for CPU)."""
        return [k for k in ("postgresql", "redis", "nats") if k not in self.private]

    def pg_url(self, dbname: str) -> str:
        base, _, _ = self.pg_admin.rpartition("/")
        return f"{base}/{dbname}"

    async def create_database(self) -> str:
        """Create a fresh database for this run, migrated; return its URL."""
        from warden.storage.migrations import migrate

        name = f"warden_bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.pg_admin)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.database = name
        conn = await asyncpg.connect(self.pg_url(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return self.pg_url(name)

    async def drop_database(self) -> None:
        """Drop this run's database (if any)."""
        if not self.database:
            return
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(self.pg_admin)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            finally:
                await conn.close()
        self.database = ""

    def stop(self) -> None:
        """Stop the servers we started."""
        stop_all(self.private.values())
        if self._handles is not None:
            self._handles.stop()  # type: ignore[attr-defined]


async def ensure_servers(
    pg_admin: str, redis_url: str, nats_url: str, base_dir: Path, *, private: bool
) -> Servers:
    """Use the servers at these URLs, or start embedded ones for any that does not
    answer; with ``private``, start this run's own Redis and NATS."""
    from warden.dev import embedded

    failures = [await embedded.probe_postgres(pg_admin)]
    if not private:
        failures += [await embedded.probe_redis(redis_url), await embedded.probe_nats(nats_url)]
    if not any(failures):
        servers = Servers(pg_admin, redis_url, nats_url)
        if private:
            await start_private_servers(servers, base_dir)
        return servers
    handles = await embedded.ensure_servers(
        nats_url, redis_url, pg_admin, base_dir, database_explicit=False
    )
    servers = Servers(
        pg_admin=handles.url("postgres"),
        redis_url=handles.url("redis"),
        nats_url=handles.url("nats"),
        embedded=[h.kind for h in handles.handles if h.embedded],
        _handles=handles,
    )
    # The embedded PostgreSQL's URL names its own database; admin work needs "postgres".
    servers.pg_admin = servers.pg_url("postgres")
    if private:
        await start_private_servers(servers, base_dir)
    return servers


def stop_all(procs: Iterable[Proc]) -> None:
    """Stop every process (in parallel: SIGTERM all, then wait)."""
    procs = list(procs)
    for p in procs:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for p in procs:
        p.stop()


def _binary(command: str, embedded_path: Callable[[], Path]) -> str:
    found = shutil.which(command)
    return found if found else str(embedded_path())


async def start_private_servers(servers: Servers, work_dir: Path) -> None:
    """Start a Redis and a NATS (JetStream) for this run on loopback; use them."""
    from warden.dev import embedded

    redis_port, nats_port = free_port(), free_port()
    redis_dir, nats_dir = work_dir / "redis", work_dir / "nats"
    redis_dir.mkdir(parents=True, exist_ok=True)
    nats_dir.mkdir(parents=True, exist_ok=True)
    redis_argv = [
        _binary("redis-server", embedded.redis_server_binary),
        "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no",
        "--dir", str(redis_dir), "--protected-mode", "no",
    ]  # fmt: skip
    nats_argv = [
        _binary("nats-server", embedded.nats_server_binary),
        "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(nats_dir),
    ]  # fmt: skip
    env = dict(os.environ)
    servers.private["redis"] = spawn("redis", redis_argv, env, work_dir, with_listeners=False)
    servers.private["nats"] = spawn("nats", nats_argv, env, work_dir, with_listeners=False)
    redis_url, nats_url = f"redis://127.0.0.1:{redis_port}/0", f"nats://127.0.0.1:{nats_port}"
    deadline = time.monotonic() + 20
    for name, probe, url in (
        ("redis", embedded.probe_redis, redis_url),
        ("nats", embedded.probe_nats, nats_url),
    ):
        while (failure := await probe(url)) is not None:
            proc = servers.private[name]
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"private {name} did not start ({failure}):\n{proc.output()}")
            await asyncio.sleep(0.1)
    servers.redis_url, servers.nats_url = redis_url, nats_url

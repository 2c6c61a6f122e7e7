"""NATS (JetStream), Redis and PostgreSQL owned by the fault suite, so it may restart them.

The shared servers of the machine serve other test sessions too: the suite never stops
them. It starts its own with ``warden dev``'s embedded-server code
(:mod:`warden.dev.embedded`: the bundled ``nats-server``, ``redis-server`` and PostgreSQL,
which runs as ``nobody`` when we are root) and restarts one by stopping it, waiting, and
starting the same command line on the same port, with the same data, so the services'
URLs stay valid and what the servers persisted (JetStream's file store, PostgreSQL's
tables) is still there. Redis runs without persistence, as the services must survive a
Redis that comes back empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from warden.dev import embedded
from warden.dev.embedded import ServerHandle
from warden.dev.procs import death_signal_preexec
from warden.storage.migrations import migrate

PROBES = {
    "nats": embedded.probe_nats,
    "redis": embedded.probe_redis,
    "postgres": embedded.probe_postgres,
}


@dataclass
class PrivateServers:
    """The three servers, by kind ("nats", "redis", "postgres")."""

    handles: dict[str, ServerHandle] = field(default_factory=dict)
    # Each restart: kind -> (down at, back at) monotonic times.
    restarts: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        return self.handles["nats"].url

    @property
    def redis_url(self) -> str:
        return self.handles["redis"].url

    @property
    def database_url(self) -> str:
        """The suite's database (``warden`` on the private PostgreSQL)."""
        return self.handles["postgres"].url

    @classmethod
    async def start(cls, base_dir: Path) -> PrivateServers:
        """Start all three under ``base_dir`` and create the migrated database."""
        servers = cls()
        try:
            servers.handles["nats"] = await embedded.start_nats(base_dir)
            servers.handles["redis"] = await embedded.start_redis(base_dir)
            servers.handles["postgres"] = await embedded.start_postgres(base_dir)
            conn = await asyncpg.connect(servers.database_url)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        except BaseException:
            servers.stop()
            raise
        return servers

    async def restart(self, kind: str, down_seconds: float) -> tuple[float, float]:
        """Stop server ``kind``, leave it down ``down_seconds``, start it again on the same
        port and data; return (stopped at, answering again at) in monotonic time."""
        handle = self.handles[kind]
        assert handle.process is not None
        argv = [str(a) for a in handle.process.args]  # type: ignore[union-attr]
        await asyncio.to_thread(handle.stop, 15.0)
        down_at = time.monotonic()
        await asyncio.sleep(down_seconds)
        self._respawn(handle, argv)
        deadline = time.monotonic() + 60
        probe = PROBES[kind]
        while (reason := await probe(handle.url)) is not None:
            if handle.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private {kind} did not come back: {reason}")
            await asyncio.sleep(0.05)
        back_at = time.monotonic()
        self.restarts.append((kind, down_at, back_at))
        return down_at, back_at

    @staticmethod
    def _respawn(handle: ServerHandle, argv: list[str]) -> None:
        # As embedded.start_* spawn them: own session, log appended, PostgreSQL as the
        # user it was initialised by (``nobody`` when we are root).
        user = None
        env = None
        if handle.kind == "postgres":
            if os.geteuid() == 0:
                user = "nobody"
            env = {**os.environ, "LC_ALL": "C"}
        assert handle.log_path is not None
        with handle.log_path.open("ab") as log:
            handle.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=death_signal_preexec(handle.stop_signal),
                user=user,
                env=env,
            )

    def stop(self) -> None:
        """Stop every server and remove PostgreSQL's cluster (it may live outside
        ``base_dir``: see ``embedded._data_dir``)."""
        for handle in self.handles.values():
            with contextlib.suppress(Exception):
                handle.stop(timeout=10)
        pg = self.handles.get("postgres")
        if pg is not None and pg.data_dir is not None:
            data = pg.data_dir.resolve()
            shutil.rmtree(data, ignore_errors=True)
            if data.parent.name.startswith("warden-dev-pg-"):  # made for it alone
                shutil.rmtree(data.parent, ignore_errors=True)


def pause(pid: int) -> None:
    """SIGSTOP ``pid`` (a worker stops answering without its connections closing)."""
    os.kill(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    """SIGCONT ``pid``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)

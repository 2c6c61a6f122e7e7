"""Run a set of long-lived child processes, restart them when they die, stop them all.

Policy when a child exits while the supervisor is not stopping: it is restarted after
an exponential backoff (``backoff_initial`` doubling up to ``backoff_max``). If one child
needs more than ``max_restarts`` restarts within ``window_seconds`` the supervisor gives
up: :attr:`Supervisor.failed` is set (with the reason in :attr:`Supervisor.failure`) and
the caller stops everything and exits non-zero. A crash loop therefore ends within
about 15 seconds with the defaults, while a one-off crash heals by itself.

Each child runs in its own session (a terminal Ctrl-C reaches only the supervisor) with
a parent-death signal of SIGKILL: if the supervisor dies without stopping them (``kill
-9``), nobody is left to escalate, and a child whose event loop is wedged never acts on
a SIGTERM, so it would survive as an orphan (issue 10). Stopping sends SIGTERM to each
child's process group, waits up to ``stop_timeout`` and then SIGKILLs whatever is left.
Children's stdout and stderr are merged and every line is printed with the child's name
in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import httpx

from warden.dev.procs import death_signal_preexec, signal_group

_COLORS = ("\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m")
_RESET = "\033[0m"
_LINE_LIMIT = 1 << 20


@dataclass(frozen=True)
class ChildSpec:
    """One supervised program: its name, command line, environment, readiness URL and
    liveness URL (empty: not watched once ready)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    ready_url: str
    live_url: str = ""


@dataclass(frozen=True)
class RestartPolicy:
    """How eagerly a dead child is restarted, and when to give up (see module doc)."""

    max_restarts: int = 5
    window_seconds: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    # Once ready, a child is probed on its live_url as Kubernetes would: this many
    # probes in a row that fail or take longer than the timeout (a wedged event loop)
    # get it killed, and so restarted.
    liveness_interval: float = 10.0
    liveness_timeout: float = 3.0
    liveness_failures: int = 3


class Output:
    """Writes lines prefixed with a source name, in colour when the stream is a TTY."""

    def __init__(self, stream: TextIO | None = None, *, color: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._color = self._stream.isatty() if color is None else color
        self._assigned: dict[str, str] = {}
        self.width = 13

    def line(self, source: str, text: str) -> None:
        """Print one line from ``source``."""
        prefix = f"{source:>{self.width}} |"
        if self._color:
            color = self._assigned.setdefault(source, _COLORS[len(self._assigned) % len(_COLORS)])
            prefix = f"{color}{prefix}{_RESET}"
        try:
            self._stream.write(f"{prefix} {text}\n")
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # our own stdout went away (piped into a closed pager): keep supervising


async def _pump(stream: asyncio.StreamReader | None, source: str, out: Output) -> None:
    """Copy a child's output to ``out`` line by line until EOF."""
    if stream is None:
        return
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the limit: print what we have
            raw = await stream.read(_LINE_LIMIT)
        if not raw:
            return
        out.line(source, raw.decode(errors="replace").rstrip("\r\n"))


async def _spawn(
    argv: Sequence[str], env: Mapping[str, str], death_signal: signal.Signals = signal.SIGKILL
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
        preexec_fn=death_signal_preexec(death_signal),
        limit=_LINE_LIMIT,
    )


async def run_once(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    out: Output,
    stop: asyncio.Event,
) -> int | None:
    """Run a one-shot command (migrations, keygen) with prefixed output.

    Returns its exit status, or None when ``stop`` was set first (the command is then
    terminated).
    """
    # One-shot commands (migrations) get SIGTERM if we die: they finish or roll back.
    proc = await _spawn(argv, env, signal.SIGTERM)
    pump = asyncio.create_task(_pump(proc.stdout, name, out))
    waiter = asyncio.create_task(proc.wait())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not waiter.done():
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), 10)
        except TimeoutError:
            signal_group(proc.pid, signal.SIGKILL)
            await waiter
        await pump
        return None
    signal_group(proc.pid, signal.SIGKILL)  # leftovers of a finished command
    await pump
    return waiter.result()


@dataclass
class _Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    starts: int = 0
    exits: deque[float] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


class Supervisor:
    """Starts the children, watches them, restarts them per policy, stops them."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        policy: RestartPolicy | None = None,
        stop_timeout: float = 30.0,
        out: Output | None = None,
        ready_poll_interval: float = 0.2,
    ) -> None:
        self._children = [_Child(spec) for spec in specs]
        self._policy = policy or RestartPolicy()
        self._stop_timeout = stop_timeout
        self._out = out or Output()
        self._poll = ready_poll_interval
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self._http = httpx.AsyncClient(timeout=2.0)

    def _log(self, text: str) -> None:
        self._out.line("dev", text)

    def pids(self) -> dict[str, int]:
        """The pid of each child's current process (children not running are absent)."""
        return {
            c.spec.name: c.process.pid
            for c in self._children
            if c.process is not None and c.process.returncode is None
        }

    def starts(self) -> dict[str, int]:
        """How many times each child has been started (1 means never restarted)."""
        return {c.spec.name: c.starts for c in self._children}

    def start(self) -> None:
        """Start watching (and so spawning) every child; returns at once."""
        for child in self._children:
            child.task = asyncio.create_task(self._watch(child), name=f"watch {child.spec.name}")

    async def wait_ready(self, limit: float) -> list[str]:
        """Wait until every child's readiness URL answers 200.

        Returns the names of the children that were not ready when ``limit`` seconds
        passed or the supervisor gave up (empty list: all ready).
        """
        deadline = time.monotonic() + limit
        while True:
            pending = [c.spec.name for c in self._children if not c.ready]
            if not pending or self.failed.is_set():
                return pending
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return pending
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _watch(self, child: _Child) -> None:
        policy = self._policy
        while not self._stopping.is_set():
            child.ready = False
            child.starts += 1
            try:
                proc = await _spawn(child.spec.argv, child.spec.env)
            except OSError as exc:
                self._give_up(f"{child.spec.name} cannot be started: {exc}")
                return
            child.process = proc
            if self._stopping.is_set():
                # Spawned while stop() was signalling the others: it has done nothing yet,
                # and stop() did not see it, so end it here.
                signal_group(proc.pid, signal.SIGKILL)
            pump = asyncio.create_task(_pump(proc.stdout, child.spec.name, self._out))
            readiness = asyncio.create_task(self._await_ready(child, proc))
            status = await proc.wait()
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
            # Whatever the child left in its group (workers it forked) goes with it.
            signal_group(proc.pid, signal.SIGKILL)
            await pump
            child.ready = False
            self._changed.set()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            child.exits.append(now)
            while child.exits and now - child.exits[0] > policy.window_seconds:
                child.exits.popleft()
            if len(child.exits) > policy.max_restarts:
                self._give_up(
                    f"{child.spec.name} exited with status {status} "
                    f"{len(child.exits)} times within {policy.window_seconds:.0f}s; giving up"
                )
                return
            delay = min(policy.backoff_initial * 2 ** (len(child.exits) - 1), policy.backoff_max)
            self._log(
                f"{child.spec.name} exited unexpectedly with status {status}; "
                f"restarting in {delay:.1f}s ({len(child.exits)}/{policy.max_restarts})"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _await_ready(self, child: _Child, proc: asyncio.subprocess.Process) -> None:
        while proc.returncode is None:
            try:
                response = await self._http.get(child.spec.ready_url)
                if response.status_code == 200:
                    child.ready = True
                    self._changed.set()
                    if child.starts > 1:
                        self._log(f"{child.spec.name} is ready again (pid {proc.pid})")
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            await asyncio.sleep(self._poll)
        if child.spec.live_url and proc.returncode is None:
            await self._watch_liveness(child, proc)

    async def _watch_liveness(self, child: _Child, proc: asyncio.subprocess.Process) -> None:
        """Kill the child once its liveness probe fails too often in a row (it then
        exits, and ``_watch`` restarts it like any other death)."""
        policy = self._policy
        failures = 0
        while proc.returncode is None and not self._stopping.is_set():
            await asyncio.sleep(policy.liveness_interval)
            try:
                response = await self._http.get(
                    child.spec.live_url, timeout=policy.liveness_timeout
                )
                alive = response.status_code == 200
            except httpx.HTTPError:
                alive = False
            failures = 0 if alive else failures + 1
            if failures >= policy.liveness_failures and not self._stopping.is_set():
                self._log(
                    f"{child.spec.name} failed {failures} liveness probes in a row "
                    f"(pid {proc.pid}); killing it"
                )
                signal_group(proc.pid, signal.SIGKILL)
                return

    def _give_up(self, reason: str) -> None:
        self._log(reason)
        if self.failure is None:
            self.failure = reason
        self.failed.set()
        self._changed.set()

    async def stop(self) -> None:
        """SIGTERM every child's group, wait (bounded), SIGKILL the rest, reap all."""
        self._stopping.set()
        running = [
            c.process
            for c in self._children
            if c.process is not None and c.process.returncode is None
        ]
        for proc in running:
            signal_group(proc.pid, signal.SIGTERM)
        if running:
            _, late = await asyncio.wait(
                [asyncio.create_task(p.wait()) for p in running], timeout=self._stop_timeout
            )
            if late:
                self._log(
                    f"{len(late)} child(ren) still running after "
                    f"{self._stop_timeout:.0f}s; killing them"
                )
        self.kill()
        tasks = [c.task for c in self._children if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    def kill(self) -> None:
        """SIGKILL every child's process group now (second Ctrl-C, or after the timeout)."""
        self._stopping.set()
        for child in self._children:
            if child.process is not None:
                signal_group(child.process.pid, signal.SIGKILL)

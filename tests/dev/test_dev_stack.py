"""`warden dev` end to end, with a stand-in CLI (tests/dev/fake_warden.py) as the services.

Each test runs ``run_dev`` in a real child process, as ``warden dev`` would, and talks
to it only through signals, HTTP and its output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from dev_helpers import (
    REAL_NATS,
    REAL_POSTGRES,
    REAL_REDIS,
    assert_gone,
    fake_command,
    processes_mentioning,
)

from warden.dev.procs import free_port, group_members, pid_alive

RUN_DEV = (
    "from warden.dev.stack import run_dev; from warden.settings import load_settings; "
    "raise SystemExit(run_dev(load_settings()))"
)
SERVICES = ("gateway", "filter-worker", "moderator", "webhooks")


class Stack:
    """A running `warden dev` whose output is collected line by line."""

    running: ClassVar[list[Stack]] = []

    def __init__(
        self, env: dict[str, str], argv: list[str] | None = None, cwd: Path | None = None
    ) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-c", RUN_DEV],
            env=env,
            cwd=cwd,
            # Its own process group, so a test can signal it as a terminal's Ctrl-C does.
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Stack.running.append(self)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0, start: int = 0) -> int:
        """Index of the first line (from ``start``) containing ``text``; fail on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            if exited:
                self._reader.join(5)  # all output is in once the pipe is closed
            with self._new:
                for i in range(start, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                remaining = deadline - time.monotonic()
                if remaining <= 0 or exited:
                    pytest.fail(f"{text!r} not seen; output:\n" + "\n".join(self.lines))
                self._new.wait(min(remaining, 0.2))

    def output(self) -> str:
        return "\n".join(self.lines)

    def finish(self, sig: signal.Signals | None = signal.SIGTERM, timeout: float = 60) -> int:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout)
            self._reader.join(5)
            return status
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("warden dev did not exit; output:\n" + self.output())


def fake_pids(path: Path) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, pid = line.split()
            pids.setdefault(name, []).append(int(pid))
    return pids


@pytest.fixture(autouse=True)
def _no_stack_left_behind() -> Iterator[None]:
    """Stop any stack a failed test left running (its children die with it)."""
    yield
    while Stack.running:
        stack = Stack.running.pop()
        if stack.proc.poll() is None:
            stack.proc.terminate()
            try:
                stack.proc.wait(60)
            except subprocess.TimeoutExpired:
                stack.proc.kill()
                stack.proc.wait()


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a dev stack using the fake CLI on free ports under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env.update(
        {
            "PS_DEV_COMMAND": fake_command(),
            "PS_DEV_DIR": str(tmp_path / "state"),
            "PS_HTTP_BIND": f"127.0.0.1:{free_port()}",
            "PS_HTTP_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "PS_DEV_FILTER_WORKER_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "PS_DEV_MODERATOR_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "PS_DEV_WEBHOOKS_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "PS_DEV_RESTART_BACKOFF_SECONDS": "0.1",
            "FAKE_WARDEN_PIDS": str(tmp_path / "pids"),
        }
    )
    return env


def metrics_binds(env: dict[str, str]) -> list[str]:
    return [
        env["PS_HTTP_METRICS_BIND"],
        env["PS_DEV_FILTER_WORKER_METRICS_BIND"],
        env["PS_DEV_MODERATOR_METRICS_BIND"],
        env["PS_DEV_WEBHOOKS_METRICS_BIND"],
    ]


def test_stack_with_answering_servers(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **base_env,
        "PS_NATS_URL": REAL_NATS,
        "PS_REDIS_URL": REAL_REDIS,
        "PS_DATABASE": REAL_POSTGRES,
    }
    stack = Stack(env)
    stack.wait_for("press Ctrl-C to stop")
    output = stack.output()
    assert f"gateway at http://{env['PS_HTTP_BIND']}" in output
    assert f"server keys: http://{env['PS_HTTP_BIND']}/_matrix/key/v2/server" in output
    assert "NATS: using nats://127.0.0.1:4222" in output
    assert "migrate | migrations applied" in output  # the fake migrate reached PS_DATABASE
    for bind in metrics_binds(env):
        assert httpx.get(f"http://{bind}/readyz").status_code == 200
    key = httpx.get(f"http://{env['PS_HTTP_BIND']}/_matrix/key/v2/server")
    assert key.status_code == 200
    # Keys were generated in the dev directory.
    keys = tmp_path / "state" / "keys"
    assert (keys / "signing.key").exists()
    assert (keys / "event_signing.key").exists()
    pids = fake_pids(tmp_path / "pids")
    assert sorted(pids) == sorted(SERVICES)
    all_pids = [p for group in pids.values() for p in group]

    assert stack.finish(signal.SIGTERM) == 0
    assert_gone(all_pids, timeout=1)
    assert all(group_members(p) == [] for p in all_pids)
    output = stack.output()
    for name in SERVICES:
        assert f"{name:>13} | {name} stopped" in output  # each drained on SIGTERM
    assert "stopping embedded servers" not in output  # none were started


def test_stack_with_embedded_servers_restart_and_ctrl_c(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **base_env,
        "PS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "PS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        # PS_DATABASE unset: the policyserv default cannot log in here, so embedded.
        "FAKE_WARDEN_CHECK_BUS": "1",  # each service checks it can reach NATS and Redis
    }
    stack = Stack(env)
    ready = stack.wait_for("press Ctrl-C to stop", timeout=90)
    output = stack.output()
    assert "NATS: embedded at nats://127.0.0.1:" in output
    assert "Redis: embedded at redis://127.0.0.1:" in output
    assert "PostgreSQL: the default postgres://policyserv:***@" in output
    assert "PostgreSQL: embedded at postgres://postgres@127.0.0.1:" in output
    assert "migrate | migrations applied" in output
    state = tmp_path / "state"
    assert (state / "nats" / "jetstream").is_dir()
    assert (state / "pg" / "data" / "PG_VERSION").exists()
    embedded_pids = [int(pid) for pid in re.findall(r"embedded at \S+ \(pid (\d+),", output)]
    assert len(embedded_pids) == 3
    assert all(pid_alive(p) for p in embedded_pids)

    # A service that dies is restarted and becomes ready again.
    victim = fake_pids(tmp_path / "pids")["moderator"][0]
    os.kill(victim, signal.SIGKILL)
    stack.wait_for("moderator is ready again", timeout=30, start=ready)
    assert httpx.get(f"http://{env['PS_DEV_MODERATOR_METRICS_BIND']}/readyz").status_code == 200
    pids = fake_pids(tmp_path / "pids")
    assert len(pids["moderator"]) == 2
    all_pids = [p for group in pids.values() for p in group]

    # Ctrl-C (SIGINT) stops everything, embedded servers included, with status 0.
    assert stack.finish(signal.SIGINT) == 0
    assert "stopping embedded servers" in stack.output()
    assert_gone(all_pids + embedded_pids, timeout=1)
    assert all(group_members(p) == [] for p in embedded_pids)  # PostgreSQL's backends too
    assert processes_mentioning(str(state)) == []
    # The cluster may live outside tmp_path (see embedded._data_dir): check by its path.
    assert processes_mentioning(str((state / "pg" / "data").resolve())) == []


def test_crash_looping_service_stops_the_stack(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **base_env,
        "PS_NATS_URL": REAL_NATS,
        "PS_REDIS_URL": REAL_REDIS,
        "PS_DATABASE": REAL_POSTGRES,
        "FAKE_WARDEN_CRASH": "webhooks",
        "PS_DEV_MAX_RESTARTS": "2",
    }
    stack = Stack(env)
    assert stack.finish(sig=None) == 1
    output = stack.output()
    assert "error: webhooks exited with status 3 3 times" in output
    others = [p for name, group in fake_pids(tmp_path / "pids").items() for p in group]
    assert others  # the healthy services had started ...
    assert not any(pid_alive(p) for p in others)  # ... and were stopped


def test_explicit_database_that_fails_is_reported(base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "PS_NATS_URL": REAL_NATS,
        "PS_REDIS_URL": REAL_REDIS,
        "PS_DATABASE": f"postgres://someone:hunter2@127.0.0.1:{free_port()}/nothing",
    }
    stack = Stack(env)
    assert stack.finish(sig=None) == 1
    output = stack.output()
    assert "error: PS_DATABASE=postgres://someone:***@127.0.0.1:" in output
    assert "hunter2" not in output


def test_port_in_use_is_reported(base_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**base_env, "PS_DEV_MODERATOR_METRICS_BIND": f"127.0.0.1:{port}"}
        stack = Stack(env)
        assert stack.finish(sig=None, timeout=30) == 1
    assert f"error: 127.0.0.1:{port} (moderator PS_HTTP_METRICS_BIND) is already in use" in (
        stack.output()
    )


def _kill_leftovers(pids: list[int]) -> None:
    """Kill what a failing test would otherwise leave running."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _stubborn_env(base_env: dict[str, str]) -> dict[str, str]:
    # The filter worker ignores SIGTERM, as one whose event loop is wedged does.
    return {
        **base_env,
        "PS_NATS_URL": REAL_NATS,
        "PS_REDIS_URL": REAL_REDIS,
        "PS_DATABASE": REAL_POSTGRES,
        "FAKE_WARDEN_IGNORE_TERM": "filter-worker",
        "PS_DEV_STOP_GRACE_SECONDS": "1",
    }


def test_a_killed_warden_dev_leaves_no_service_behind(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    stack = Stack(_stubborn_env(base_env))
    stack.wait_for("press Ctrl-C to stop")
    pids = fake_pids(tmp_path / "pids")
    all_pids = [p for group in pids.values() for p in group]
    try:
        assert stack.finish(signal.SIGKILL) == -signal.SIGKILL
        assert_gone(all_pids, timeout=10)  # the stubborn worker too: no orphan
    finally:
        _kill_leftovers(all_pids)


def test_a_closed_terminal_stops_a_service_ignoring_sigterm_after_the_grace(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    stack = Stack(_stubborn_env(base_env))
    stack.wait_for("press Ctrl-C to stop")
    pids = fake_pids(tmp_path / "pids")
    all_pids = [p for group in pids.values() for p in group]
    try:
        assert stack.finish(signal.SIGHUP) == 0
        assert_gone(all_pids, timeout=1)
        output = stack.output()
        assert "1 child(ren) still running after 1s; killing them" in output
        assert f"{'gateway':>13} | gateway stopped" in output  # the others drained
        assert f"{'filter-worker':>13} | filter-worker stopped" not in output
    finally:
        _kill_leftovers(all_pids)

"""The supervisor: readiness, prefixed output, restart with backoff, giving up, stopping."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import time

from dev_helpers import FAKE_WARDEN, assert_gone

from warden.dev.procs import free_port, group_members, pid_alive
from warden.dev.supervisor import ChildSpec, Output, RestartPolicy, Supervisor, run_once


def spec(name: str, **env: str) -> ChildSpec:
    """A fake service child serving /readyz on a fresh port."""
    bind = f"127.0.0.1:{free_port()}"
    return ChildSpec(
        name=name,
        argv=(sys.executable, str(FAKE_WARDEN), name),
        env={**os.environ, "PS_HTTP_METRICS_BIND": bind, "PS_HTTP_BIND": "127.0.0.1:0", **env},
        ready_url=f"http://{bind}/readyz",
        live_url=f"http://{bind}/livez",
    )


async def wait_for(predicate: object, limit: float = 10.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


async def test_start_ready_prefixed_output_and_stop() -> None:
    buffer = io.StringIO()
    sup = Supervisor([spec("alpha"), spec("beta")], out=Output(buffer, color=False))
    sup.start()
    try:
        assert await sup.wait_ready(20) == []
        pids = sup.pids()
        assert set(pids) == {"alpha", "beta"}
        assert all(pid_alive(p) for p in pids.values())
    finally:
        await sup.stop()
    assert_gone(list(pids.values()), timeout=1)  # stop() returns only after reaping
    assert all(group_members(p) == [] for p in pids.values())
    lines = buffer.getvalue().splitlines()
    assert "        alpha | alpha listening on " + sup_bind(lines, "alpha") in lines
    assert "         beta | beta stopped" in lines  # it saw SIGTERM and exited cleanly
    assert sup.starts() == {"alpha": 1, "beta": 1}
    assert not sup.failed.is_set()


def sup_bind(lines: list[str], name: str) -> str:
    prefix = f"{name:>13} | {name} listening on "
    return next(line[len(prefix) :] for line in lines if line.startswith(prefix))


async def test_a_killed_child_is_restarted() -> None:
    buffer = io.StringIO()
    sup = Supervisor(
        [spec("alpha"), spec("beta")],
        policy=RestartPolicy(backoff_initial=0.1),
        out=Output(buffer, color=False),
    )
    sup.start()
    try:
        assert await sup.wait_ready(20) == []
        first = sup.pids()["alpha"]
        other = sup.pids()["beta"]
        os.kill(first, signal.SIGKILL)
        assert await wait_for(lambda: sup.starts()["alpha"] == 2)
        assert await sup.wait_ready(20) == []
        assert sup.pids()["alpha"] != first
        assert sup.pids()["beta"] == other  # the others are left alone
        assert not sup.failed.is_set()
        text = buffer.getvalue()
        assert "alpha exited unexpectedly with status -9; restarting in 0.1s (1/5)" in text
        assert "alpha is ready again" in text
    finally:
        await sup.stop()
    assert not pid_alive(first)
    assert_gone(list(sup.pids().values()), timeout=1)


async def test_a_crash_loop_makes_the_supervisor_give_up() -> None:
    buffer = io.StringIO()
    steady = spec("steady")
    sup = Supervisor(
        [steady, spec("crashy", FAKE_WARDEN_CRASH="crashy")],
        policy=RestartPolicy(max_restarts=2, backoff_initial=0.05),
        out=Output(buffer, color=False),
    )
    sup.start()
    try:
        not_ready = await sup.wait_ready(20)
        assert not_ready == ["crashy"]
        assert sup.failed.is_set()
        assert sup.failure is not None
        assert "crashy exited with status 3 3 times" in sup.failure
        assert sup.starts()["crashy"] == 3  # first start + 2 restarts
        steady_pid = sup.pids()["steady"]
    finally:
        await sup.stop()
    assert not pid_alive(steady_pid)
    # Backoff doubles: 0.05 then 0.1.
    text = buffer.getvalue()
    assert "restarting in 0.1s (2/2)" in text
    assert "crashy crashing on purpose" in text


async def test_a_child_ignoring_sigterm_is_killed_after_the_timeout() -> None:
    sup = Supervisor(
        [spec("stubborn", FAKE_WARDEN_IGNORE_TERM="stubborn"), spec("polite")],
        stop_timeout=1.0,
        out=Output(io.StringIO(), color=False),
    )
    sup.start()
    assert await sup.wait_ready(20) == []
    pids = sup.pids()
    started = time.monotonic()
    await sup.stop()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5
    assert_gone(list(pids.values()), timeout=1)


async def test_not_ready_in_time_is_reported() -> None:
    # A child that runs but never serves /readyz.
    silent = ChildSpec(
        name="silent",
        argv=(sys.executable, "-c", "import time; time.sleep(60)"),
        env=dict(os.environ),
        ready_url=f"http://127.0.0.1:{free_port()}/readyz",
    )
    sup = Supervisor([silent], out=Output(io.StringIO(), color=False))
    sup.start()
    try:
        assert await sup.wait_ready(0.5) == ["silent"]
        assert not sup.failed.is_set()
    finally:
        await sup.stop()


async def test_run_once_returns_status_or_none_when_stopped() -> None:
    out = Output(io.StringIO(), color=False)
    env = dict(os.environ)
    stop = asyncio.Event()
    code = "import sys; print('hi'); sys.exit(4)"
    assert await run_once("step", [sys.executable, "-c", code], env, out, stop) == 4
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    task = asyncio.create_task(run_once("slow", slow, env, out, stop))
    await asyncio.sleep(0.5)
    stop.set()
    assert await asyncio.wait_for(task, 10) is None


async def test_a_child_that_stops_answering_its_liveness_probe_is_replaced() -> None:
    buffer = io.StringIO()
    sup = Supervisor(
        [spec("wedged"), spec("fine")],
        policy=RestartPolicy(
            backoff_initial=0.1, liveness_interval=0.2, liveness_timeout=0.5, liveness_failures=2
        ),
        out=Output(buffer, color=False),
    )
    sup.start()
    stopped: int | None = None
    try:
        assert await sup.wait_ready(20) == []
        stopped = sup.pids()["wedged"]
        other = sup.pids()["fine"]
        # Alive but answering nothing, as a process whose event loop is wedged.
        os.kill(stopped, signal.SIGSTOP)
        assert await wait_for(lambda: sup.starts()["wedged"] == 2, 20)
        assert await sup.wait_ready(20) == []
        assert not pid_alive(stopped)
        assert sup.pids()["fine"] == other  # the live one is left alone
        text = buffer.getvalue()
        assert f"wedged failed 2 liveness probes in a row (pid {stopped}); killing it" in text
        assert "wedged exited unexpectedly with status -9" in text
    finally:
        if stopped is not None and pid_alive(stopped):
            os.kill(stopped, signal.SIGKILL)
        await sup.stop()
    assert_gone(list(sup.pids().values()), timeout=1)

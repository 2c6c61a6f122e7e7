"""Helpers for the `warden dev` tests: process checks and the fake CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from warden.dev.procs import pid_alive, wait_until

FAKE_WARDEN = Path(__file__).with_name("fake_warden.py")
REAL_NATS = "nats://127.0.0.1:4222"
REAL_REDIS = "redis://127.0.0.1:6379/0"
REAL_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"


def fake_command() -> str:
    """``PS_DEV_COMMAND`` value that runs the fake CLI with this interpreter."""
    return f"{sys.executable} {FAKE_WARDEN}"


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Fail unless every pid has exited within ``timeout``."""
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout), [
        p for p in pids if pid_alive(p)
    ]

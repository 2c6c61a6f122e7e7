"""A redis-server of a test's own on a free loopback port, which the test may stop and
start again (the shared Redis is never stopped)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

from warden.dev.embedded import redis_server_binary
from warden.dev.procs import free_port


class PrivateRedis:
    """``redis-server --port <free> --save ''``: ``start``, ``stop`` (SIGKILL), ``url``."""

    def __init__(self) -> None:
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its URL (database 0: the server is the test's alone)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        binary = shutil.which("redis-server") or str(redis_server_binary())
        self._proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on {self.port}") from None
                time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP it: connections stay open but nothing is answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT it."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill it (as a crash would) and wait for it to be gone."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # a paused one too
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

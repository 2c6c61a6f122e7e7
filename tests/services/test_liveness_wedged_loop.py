"""A service whose event loop is wedged fails its liveness probe (review H3, issue 10).

``/livez`` is answered by the service's own event loop (the metrics listener runs on
it), so a loop blocked by CPU-bound code cannot answer: the probe times out and
Kubernetes replaces the pod (deploy/k8s: 3 failures of a 3 s probe every 10 s). The
test runs a real process on the service runtime, blocks its loop, and probes it as the
kubelet does. A probe moved to another thread without a loop heartbeat would answer
here and fail the test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service_processes import free_port

SCRIPT = Path(__file__).with_name("wedged_service.py")
PROBE_TIMEOUT_SECONDS = 3.0  # timeoutSeconds of the shipped liveness probes


def probe(url: str) -> int | None:
    """The status /livez answers within the probe timeout, or None (a failed probe)."""
    try:
        return httpx.get(url, timeout=PROBE_TIMEOUT_SECONDS).status_code
    except httpx.TimeoutException:
        return None


@pytest.mark.slow
def test_a_wedged_event_loop_fails_livez(tmp_path: Path) -> None:
    bind = f"127.0.0.1:{free_port()}"
    trigger = tmp_path / "wedge"
    log = tmp_path / "wedged.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), bind, str(trigger)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://{bind}/livez"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

        trigger.touch()
        deadline = time.monotonic() + 10
        while "wedging" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert [probe(url) for _ in range(3)] == [None, None, None]
        assert proc.poll() is None  # alive but wedged: only the probe can tell
    finally:
        proc.kill()
        proc.wait()

"""Every service starts against the real dependencies, reports health, logs JSON, and
drains on SIGTERM (readiness first)."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from tests.service_processes import ServiceProcess, free_port


@pytest.mark.parametrize("name", ["gateway", "filter-worker", "moderator", "webhooks"])
def test_service_serves_health_and_metrics_then_stops_cleanly(
    name: str, spawn_service: Callable[..., ServiceProcess]
) -> None:
    svc = spawn_service(name)
    svc.wait_ready()
    assert httpx.get(f"{svc.metrics_url}/livez").status_code == 200
    ready = httpx.get(f"{svc.metrics_url}/readyz").json()
    expected = {"postgresql", "nats"} | (
        {"redis"} if name in ("gateway", "filter-worker") else set()
    )
    assert ready["status"] == "ok"
    assert set(ready["checks"]) == expected
    metrics = httpx.get(f"{svc.metrics_url}/metrics").text
    assert f'warden_build_info{{service="{name}"' in metrics
    assert f'warden_dependency_up{{dependency="postgresql",service="{name}"}} 1.0' in metrics
    # Process metrics of every service: its pool (PS_DATABASE_MAX_OPEN_CONNS, default 10),
    # event-loop lag, JetStream consumer lag where it consumes, and no _created series.
    assert 'warden_db_pool_connections{state="max"} 10.0' in metrics
    assert "_created" not in metrics
    consumer = {
        "filter-worker": "warden-room-state",
        "moderator": "warden-moderator",
        "webhooks": "warden-webhooks",
    }.get(name)
    wanted = [] if consumer is None else [f'warden_bus_consumer_pending{{consumer="{consumer}"}}']

    def missing() -> list[str]:
        lag = re.search(r"^warden_event_loop_lag_seconds_count (\S+)$", metrics, re.MULTILINE)
        absent = [w for w in wanted if w not in metrics]
        return absent + ([] if lag and float(lag.group(1)) > 0 else ["loop lag samples"])

    deadline = time.monotonic() + 30
    while missing() and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = httpx.get(f"{svc.metrics_url}/metrics").text
    assert missing() == []

    assert svc.stop() == 0
    lines = [ln for ln in svc.output().splitlines() if ln.strip()]
    assert lines, "no log output"
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert all(r["service"] == name and "level" in r and "ts" in r for r in records)
    assert any(r.get("event") == "stopped" for r in records)


def test_sigterm_turns_readiness_503_before_draining(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    svc = spawn_service("filter-worker", PS_SHUTDOWN_DELAY_SECONDS="3")
    svc.wait_ready()
    svc.proc.send_signal(signal.SIGTERM)
    # During the delay the process is alive, live, and not ready.
    deadline = time.monotonic() + 2
    seen_503 = False
    while time.monotonic() < deadline:
        r = httpx.get(f"{svc.metrics_url}/readyz", timeout=1)
        if r.status_code == 503:
            assert r.json()["status"] == "draining"
            assert httpx.get(f"{svc.metrics_url}/livez").status_code == 200
            seen_503 = True
            break
        time.sleep(0.05)
    assert seen_503
    assert svc.proc.poll() is None
    assert svc.proc.wait(timeout=30) == 0


def test_service_waits_for_a_dependency_then_gives_up_with_one_clear_line(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    svc = spawn_service(
        "moderator",
        PS_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        PS_STARTUP_TIMEOUT_SECONDS="1.5",
    )
    assert svc.proc.wait(timeout=30) == 1
    records = [json.loads(ln) for ln in svc.output().splitlines() if ln.strip()]
    failed = [r for r in records if r.get("event") == "startup_failed"]
    assert len(failed) == 1
    assert "nats did not answer" in failed[0]["message"]


def test_gateway_refuses_to_start_when_both_keys_are_the_same(
    spawn_service: Callable[..., ServiceProcess], key_paths: tuple[object, object]
) -> None:
    fed, _ = key_paths
    svc = spawn_service("gateway", PS_HOMESERVER_EVENT_SIGNING_KEY_PATH=str(fed))
    assert svc.proc.wait(timeout=30) == 1
    assert "same key" in svc.output()

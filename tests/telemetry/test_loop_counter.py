"""``LoopCounter``: the same exposition as ``prometheus_client.Counter`` (the oracle) for
the same increments, without its lock."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from warden.telemetry.loop_counter import LoopCounter


def _series(text: bytes) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def test_same_exposition_as_prometheus_clients_counter() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopCounter("x_requests_total", "help", ["route", "status"], registry=ours_registry)
    theirs = Counter("x_requests_total", "help", ["route", "status"], registry=theirs_registry)
    rng = random.Random(3)
    for _ in range(3000):
        labels = (rng.choice(["/sign", "/check", 'a b"c\\d']), rng.choice(["200", "400"]))
        amount = rng.choice([1.0, 1.0, 0.0, 2.5])
        ours.labels(*labels).inc(amount)
        theirs.labels(*labels).inc(amount)
    mine = _series(generate_latest(ours_registry))
    oracle = _series(generate_latest(theirs_registry))
    assert mine == oracle
    assert any(name.startswith("x_requests_total{") for name in mine)
    # The help and type lines too.
    assert b"# TYPE x_requests_total counter" in generate_latest(ours_registry)


def test_counts_only_go_up_and_labels_are_checked() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("y_total", "help", ["layer"], registry=registry)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("memory").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("a", "b")
    assert registry.get_sample_value("y_total", {"layer": "memory"}) == 0.0
    # Described before any increment: the registry refuses a second family of that name.
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("y_total", "help", registry=registry)

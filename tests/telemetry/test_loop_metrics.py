"""``LoopHistogram`` and ``LoopCounter``: the same exposition as prometheus_client's
``Histogram`` and ``Counter`` (the oracles) for the same observations, without their
locks."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from warden.telemetry.loop_counter import LoopCounter
from warden.telemetry.loop_histogram import LoopHistogram

BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 10)


def _series(text: bytes) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def test_same_exposition_as_prometheus_clients_histogram() -> None:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = LoopHistogram("x_seconds", "help", ["filter"], BUCKETS, registry=ours_registry)
    theirs = Histogram("x_seconds", "help", ["filter"], buckets=BUCKETS, registry=theirs_registry)
    rng = random.Random(7)
    values = [rng.choice([0.0, *BUCKETS, 20.0]) for _ in range(200)]  # on the bounds too
    values += [rng.expovariate(200) for _ in range(2000)]
    for i, v in enumerate(values):
        label = ("keyword", "mentions", 'a b"c')[i % 3]
        ours.labels(label).observe(v)
        theirs.labels(label).observe(v)
    mine = _series(generate_latest(ours_registry))
    oracle = _series(generate_latest(theirs_registry))
    assert mine.keys() == oracle.keys()
    for name, value in oracle.items():
        assert mine[name] == pytest.approx(value), name
    assert mine['x_seconds_count{filter="keyword"}'] == len(values[0::3])


def test_labels_and_buckets_are_checked() -> None:
    registry = CollectorRegistry()
    hist = LoopHistogram("y_seconds", "help", ["filter"], (0.1, 1), registry=registry)
    with pytest.raises(ValueError, match="takes labels"):
        hist.labels("a", "b")
    with pytest.raises(ValueError, match="increasing"):
        LoopHistogram("z_seconds", "help", [], (1, 0.1), registry=None)
    # Described before any observation: the registry refuses a second family of that name.
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("y_seconds", "help", registry=registry)


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

"""Metrics about the process itself: database pool use and event-loop lag.

Both are cheap. The pool gauges are read from asyncpg's own counters when Prometheus
scrapes (no task, no query), and the loop lag is one timer every half second. Every
service runs one asyncio loop in one process, so a busy loop shows here before it shows
as slow requests, and a pool that is always fully in use explains requests that wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

import asyncpg
from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# How often the loop-lag task wakes up. Lag shorter than this is still measured: the
# task asks to wake after exactly ``LOOP_LAG_INTERVAL_SECONDS`` and records how late it is.
LOOP_LAG_INTERVAL_SECONDS = 0.5

EVENT_LOOP_LAG = Histogram(
    "warden_event_loop_lag_seconds",
    "How late the event loop ran a timer that was due (sampled every 0.5 s): time during"
    " which no request, message or health check could make progress.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_POOL_HELP = (
    "PostgreSQL connections of this process's asyncpg pool: in_use (acquired), idle"
    " (open, free) and max (PS_DATABASE_MAX_OPEN_CONNS)."
)


class DbPoolCollector(Collector):
    """Reports the pools registered with ``watch_pool`` when scraped."""

    def __init__(self) -> None:
        # asyncpg pools take no weak references: closed pools are dropped when scraped.
        self._pools: list[asyncpg.Pool] = []

    def watch(self, pool: asyncpg.Pool) -> None:
        """Report ``pool`` from now on."""
        if pool not in self._pools:
            self._pools.append(pool)

    def describe(self) -> Iterable[Metric]:
        """The family without samples (the registry learns its name at registration)."""
        return [GaugeMetricFamily("warden_db_pool_connections", _POOL_HELP, labels=["state"])]

    def collect(self) -> Iterator[Metric]:
        """Sum the registered pools' sizes (a service has one pool)."""
        in_use = idle = maximum = 0
        self._pools = [p for p in self._pools if not p.is_closing()]
        for pool in self._pools:
            size, free = pool.get_size(), pool.get_idle_size()
            in_use += size - free
            idle += free
            maximum += pool.get_max_size()
        family = GaugeMetricFamily("warden_db_pool_connections", _POOL_HELP, labels=["state"])
        family.add_metric(["in_use"], in_use)
        family.add_metric(["idle"], idle)
        family.add_metric(["max"], maximum)
        yield family


DB_POOLS = DbPoolCollector()
REGISTRY.register(DB_POOLS)


def watch_pool(pool: asyncpg.Pool) -> None:
    """Export ``pool``'s use as ``warden_db_pool_connections``."""
    DB_POOLS.watch(pool)


async def measure_loop_lag(interval: float = LOOP_LAG_INTERVAL_SECONDS) -> None:
    """Observe ``warden_event_loop_lag_seconds`` every ``interval`` until cancelled."""
    loop = asyncio.get_running_loop()
    observe = EVENT_LOOP_LAG.observe
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        observe(max(0.0, loop.time() - start - interval))

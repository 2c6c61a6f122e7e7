"""A labelled Prometheus histogram for values observed many times per request, on the
event loop only.

``prometheus_client.Histogram.observe`` takes a lock for the bucket and again for the
sum and walks the buckets in Python: about 2 µs. The filter worker observes one
duration per filter per event (twenty-odd per event), which made the metric cost more
than most filters. Every Warden service observes and serves ``/metrics`` on its one
event loop thread, so the counts need no lock: an observation here is one ``bisect``
and two additions. The exposition (``_bucket``, ``_count``, ``_sum``) is the same as
``Histogram``'s, without the ``_created`` series.

Not for values observed from other threads (``asyncio.to_thread`` work): use
``prometheus_client.Histogram`` there.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from prometheus_client import REGISTRY
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from warden.telemetry.loop_family import LoopFamily

# The library's own formatting of bucket bounds (``le="0.0001"``), untyped there.
_bound_text = cast(Callable[[float], str], floatToGoString)


class LoopHistogramChild:
    """One label set's counts: ``observe`` only from the event loop's thread."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is at least it."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.total += value


class LoopHistogram(LoopFamily[LoopHistogramChild]):
    """A histogram with labels, exposed like ``prometheus_client.Histogram``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        """Register under ``name`` (no ``_seconds`` suffix is added) in ``registry``."""
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("buckets must be increasing")
        self._bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> LoopHistogramChild:
        return LoopHistogramChild(self._bounds)

    def describe(self) -> Iterable[Metric]:
        """The family without samples (the registry learns its names at registration)."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """Cumulative buckets, count and sum per label set."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        names = [_bound_text(b) for b in self._bounds] + ["+Inf"]
        for key, child in list(self._children.items()):
            running = 0
            buckets: list[tuple[str, float]] = []
            for name, count in zip(names, list(child.counts), strict=True):
                running += count
                buckets.append((name, float(running)))
            family.add_metric(list(key), buckets, child.total)
        yield family

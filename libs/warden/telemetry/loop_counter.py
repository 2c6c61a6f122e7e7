"""A labelled Prometheus counter incremented on the event loop only.

``prometheus_client.Counter.inc`` checks the child is observable and takes a lock per
call: about 1 µs, and the gateway counts four things per ``/sign`` request (the request,
the event-check and verdict cache layers, the HTTP answer), in a spam wave on a core
whose whole budget per request is a couple of hundred microseconds. Every Warden service
counts and serves ``/metrics`` on its one event loop thread (as ``LoopHistogram``), so an
increment here is one addition. The exposition is ``Counter``'s (``<name>_total``),
without the ``_created`` series, which Warden turns off everywhere.

Not for counts made from other threads (``asyncio.to_thread`` work): use
``prometheus_client.Counter`` there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from warden.telemetry.loop_family import LoopFamily


class LoopCounterChild:
    """One label set's count: ``inc`` only from the event loop's thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (never negative: a counter only goes up)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class LoopCounter(LoopFamily[LoopCounterChild]):
    """A counter with labels, exposed like ``prometheus_client.Counter``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        """Register ``name`` (with or without its ``_total`` suffix) in ``registry``."""
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new_child(self) -> LoopCounterChild:
        return LoopCounterChild()

    def describe(self) -> Iterable[Metric]:
        """The family without samples (the registry learns its names at registration)."""
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """One ``_total`` sample per label set."""
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(list(key), child.value)
        yield family

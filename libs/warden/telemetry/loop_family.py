"""What the event-loop metrics (``LoopCounter``, ``LoopHistogram``) share: a registered
family of children, one per label set, created on first use and never locked (they are
only touched on the event loop's thread)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from prometheus_client.registry import Collector, CollectorRegistry

ChildT = TypeVar("ChildT")


class LoopFamily(Collector, Generic[ChildT]):
    """Name, help, label names and children of one metric; subclasses make children
    (``_new_child``) and expose them (``describe``, ``collect``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def labels(self, *values: str) -> ChildT:
        """The child for these label values (created on first use)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

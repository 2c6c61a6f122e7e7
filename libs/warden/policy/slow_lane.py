"""Telling a worker's batch that one evaluation now waits on an outside service.

A filter worker answers the events that arrived together as one batch (one Redis round
trip for their caches and claims, one for their replies). A filter that waits on an
outside service (a media download and HMA scan, a moderation model) can take seconds,
and the other events of its batch must not wait for it. Before such a wait the filter
calls ``waiting_outside()``: the batch then answers the events that are done as soon as
every event still running is one that waits outside, rather than after a fixed delay.

The evaluation sets the callback for its own task (``watch``); work done in another
task on behalf of several evaluations (one media scan shared by its askers) takes each
asker's callback with ``current()`` and calls them when it goes outside. Outside a
worker's batch (tests, the admin API's dry runs) nothing is watching and the calls cost
a context-variable read.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

Mark = Callable[[], None]

_watching: ContextVar[Mark | None] = ContextVar("warden_slow_lane", default=None)


def watch(mark: Mark) -> None:
    """Call ``mark`` when the current task's evaluation waits outside (set in the
    evaluation's own task: a task's context is its own copy)."""
    _watching.set(mark)


def current() -> Mark | None:
    """The current evaluation's callback, if a batch is watching it."""
    return _watching.get()


def waiting_outside() -> None:
    """The current evaluation is about to wait on an outside service."""
    mark = _watching.get()
    if mark is not None:
        mark()

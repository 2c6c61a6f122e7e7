"""Where each filter of a community runs, and whether it counts: dry run and conditions.

Two community keys, declared here:

* ``dry_run_filters``: filter names (as verdicts name them) or ``["*"]`` for all. Those
  filters run where they would run anyway and their outcomes are recorded with
  ``"dry_run": true`` and counted in ``warden_filter_dry_run_outcomes_total``, but they
  count towards neither the verdict nor anything done because of it: the class and
  harms ignore them, the hellban postfilter does not see them (and sets no ban while in
  dry run itself), a failing dry-run filter never gives an evaluation up, and webhooks
  and the moderator act on the verdict, which they do not change.
* ``filter_conditions``: ``{"<filter>": {"room_ids": [...], "not_room_ids": [...],
  "event_types": [...], "sender_servers": [globs], "not_sender_servers": [globs]}}``.
  A filter runs only for events matching every field given; a skip is counted in
  ``warden_filter_condition_skips_total``.

Both are checked when written (an unknown filter or field is refused, naming it) and
compiled once per configuration object (``compile_scope``): the pipeline keeps the result
with the configuration's enabled filters, and a configuration setting neither key costs
nothing per event.

Server conditions are judged on the sender's server only when the sender is verified
(``FilterContext.sender_verified``): otherwise the server part of ``sender`` is only a
claim, and a claim must not switch a filter off, so the filter runs. Server names are
compared in lower case, as DNS names are: ``EVIL.example`` is ``evil.example``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from warden.matrix.globs import GlobIndex, glob_rejection
from warden.policy.config import ConfigError, ConfigKey, declare
from warden.policy.verdict import FilterOutcome

if TYPE_CHECKING:
    from warden.filters.base import Filter, FilterContext

logger = logging.getLogger(__name__)

ALL_FILTERS = "*"
ROOM_IDS = "room_ids"
NOT_ROOM_IDS = "not_room_ids"
EVENT_TYPES = "event_types"
SENDER_SERVERS = "sender_servers"
NOT_SENDER_SERVERS = "not_sender_servers"
CONDITION_FIELDS = (ROOM_IDS, NOT_ROOM_IDS, EVENT_TYPES, SENDER_SERVERS, NOT_SENDER_SERVERS)
# Fields that say where a filter runs: an empty list would mean "nowhere", which is
# never meant (disable the filter instead), so it is refused.
_POSITIVE_FIELDS = frozenset({ROOM_IDS, EVENT_TYPES, SENDER_SERVERS})

MAX_CONDITION_VALUES = 1000
"""Most entries one condition field may list (bounds the configuration's size)."""
MAX_VALUE_BYTES = 255
"""Longest room ID, event type or server glob accepted (the spec's identifier limit)."""

DRY_RUN_OUTCOMES = Counter(
    "warden_filter_dry_run_outcomes_total",
    "Outcomes of filters a community runs in dry run (dry_run_filters), by filter and "
    "class; they count towards no verdict.",
    ["filter", "class"],
)
CONDITION_SKIPS = Counter(
    "warden_filter_condition_skips_total",
    "Filter runs skipped because the event did not match the filter's filter_conditions.",
    ["filter"],
)


def _registered_names() -> frozenset[str]:
    from warden.filters.registry import BY_NAME  # the registry imports this module

    return frozenset(BY_NAME)


def validate_dry_run_filters(value: Any) -> list[str]:
    """``dry_run_filters`` checked: registered filter names, or ``["*"]`` alone."""
    names: list[str] = list(value)
    if ALL_FILTERS in names:
        if len(names) != 1:
            raise ConfigError(DRY_RUN_FILTERS.name, f'"{ALL_FILTERS}" must be the only entry')
        return names
    known = _registered_names()
    for name in names:
        if name not in known:
            raise ConfigError(DRY_RUN_FILTERS.name, f"unknown filter {name!r}")
    return list(dict.fromkeys(names))


def validate_filter_conditions(value: Any) -> dict[str, Any]:
    """``filter_conditions`` checked: registered filters, known fields, bounded lists."""
    known = _registered_names()
    out: dict[str, Any] = {}
    for name, spec in dict(value).items():
        if name not in known:
            raise ConfigError(FILTER_CONDITIONS.name, f"unknown filter {name!r}")
        out[name] = _check_condition(name, spec)
    return out


def _check_condition(name: str, spec: Any) -> dict[str, list[str]]:
    where = f"{FILTER_CONDITIONS.name}.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(where, "must be a JSON object")
    out: dict[str, list[str]] = {}
    for fld, values in spec.items():
        if fld not in CONDITION_FIELDS:
            raise ConfigError(
                where, f"unknown field {fld!r} (known: {', '.join(CONDITION_FIELDS)})"
            )
        at = f"{where}.{fld}"
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(at, "must be a list of strings")
        if not values and fld in _POSITIVE_FIELDS:
            raise ConfigError(at, "must not be empty (an empty list would match nothing)")
        if len(values) > MAX_CONDITION_VALUES:
            raise ConfigError(at, f"at most {MAX_CONDITION_VALUES} entries")
        for v in values:
            _check_value(at, fld, v)
        out[fld] = list(dict.fromkeys(values))
    return out


def _check_value(at: str, fld: str, value: str) -> None:
    if not value or len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
        raise ConfigError(at, f"entries must be 1 to {MAX_VALUE_BYTES} bytes")
    if fld in (ROOM_IDS, NOT_ROOM_IDS) and not value.startswith("!"):
        raise ConfigError(at, f"{value!r} is not a room ID")
    if fld in (SENDER_SERVERS, NOT_SENDER_SERVERS) and glob_rejection(value) is not None:
        raise ConfigError(at, f"{value!r} is not an acceptable server glob")


DRY_RUN_FILTERS, FILTER_CONDITIONS = declare(
    ConfigKey(
        "dry_run_filters",
        "list[str]",
        [],
        'Filters (by name, as verdicts list them) or ["*"] for all, that run in dry run: '
        "their outcomes are recorded with dry_run true but count towards no verdict, "
        "hellban or report.",
        validate=validate_dry_run_filters,
    ),
    ConfigKey(
        "filter_conditions",
        "object",
        {},
        "Per filter name, where it runs: room_ids, not_room_ids, event_types, "
        "sender_servers and not_sender_servers (globs); every field given must match.",
        validate=validate_filter_conditions,
    ),
)


class Condition:
    """One filter's compiled ``filter_conditions`` entry."""

    __slots__ = ("_event_types", "_not_rooms", "_not_servers", "_rooms", "_servers")

    def __init__(self, spec: Mapping[str, list[str]]) -> None:
        def values(fld: str) -> frozenset[str] | None:
            return frozenset(spec[fld]) if fld in spec else None

        def globs(fld: str) -> GlobIndex[bool] | None:
            if fld not in spec:
                return None
            return GlobIndex((g.lower(), True) for g in spec[fld])

        self._rooms = values(ROOM_IDS)
        self._not_rooms = values(NOT_ROOM_IDS)
        self._event_types = values(EVENT_TYPES)
        self._servers = globs(SENDER_SERVERS)
        self._not_servers = globs(NOT_SENDER_SERVERS)

    def matches(self, ctx: FilterContext) -> bool:
        """Whether the filter runs for this event (every field given matches)."""
        if self._rooms is not None and ctx.room_id not in self._rooms:
            return False
        if self._not_rooms and ctx.room_id in self._not_rooms:
            return False
        if self._event_types is not None and ctx.event_type not in self._event_types:
            return False
        if self._servers is None and self._not_servers is None:
            return True
        if not ctx.sender_verified:
            return True  # an unproven server name never switches a filter off
        server = ctx.sender.partition(":")[2].lower()
        if self._servers is not None and self._servers.first_match(server) is None:
            return False
        return not (self._not_servers and self._not_servers.first_match(server) is not None)


class Scope:
    """A configuration's dry-run filters and conditions, compiled (``compile_scope``)."""

    __slots__ = ("_all_dry", "_conditions", "_dry")

    def __init__(self, dry_run: Iterable[str], conditions: Mapping[str, Condition]) -> None:
        names = frozenset(dry_run)
        self._all_dry = ALL_FILTERS in names
        self._dry = names
        self._conditions = dict(conditions)

    def is_dry(self, name: str) -> bool:
        """Whether the filter runs in dry run."""
        return self._all_dry or name in self._dry

    def select(self, active: list[Filter], ctx: FilterContext) -> list[Filter]:
        """The filters of ``active`` whose conditions ``ctx``'s event matches."""
        conditions = self._conditions
        if not conditions:
            return active
        chosen: list[Filter] = []
        for flt in active:
            condition = conditions.get(flt.name)
            if condition is None or condition.matches(ctx):
                chosen.append(flt)
            else:
                _count(_SKIPS, CONDITION_SKIPS, flt.name)
        return chosen


_SKIPS: dict[Any, Any] = {}
_DRY: dict[Any, Any] = {}


def _count(children: dict[Any, Any], counter: Counter, *labels: str) -> None:
    # Children bound once per label set (bounded: registered filters times classes).
    child = children.get(labels)
    if child is None:
        child = children[labels] = counter.labels(*labels)
    child.inc()


def compile_scope(config: Mapping[str, Any]) -> Scope | None:
    """The scope ``config`` sets, or None when it sets neither key (nothing to do).

    A stored value that no longer validates (a filter since removed, a field since
    renamed) loses only that entry, logged: a filter then runs unconditionally and
    counts, the fail-secure reading.
    """
    dry = config.get(DRY_RUN_FILTERS.name) or ()
    raw = config.get(FILTER_CONDITIONS.name) or {}
    if not dry and not raw:
        return None
    known = _registered_names()
    conditions: dict[str, Condition] = {}
    for name, spec in raw.items():
        try:
            if name not in known:
                raise ConfigError(FILTER_CONDITIONS.name, f"unknown filter {name!r}")
            conditions[name] = Condition(_check_condition(name, spec))
        except ConfigError as exc:
            logger.warning(
                "ignoring filter condition", extra={"key": exc.key, "reason": exc.message}
            )
    return Scope(dry, conditions)


def dry_context(ctx: FilterContext) -> FilterContext:
    """A copy of ``ctx`` for a dry-run filter (``dry_run`` set; cached texts kept)."""
    dry = copy.copy(ctx)
    dry.dry_run = True
    return dry


def mark_dry_run(outcome: FilterOutcome) -> FilterOutcome:
    """``outcome`` marked as a dry run, and counted."""
    _count(_DRY, DRY_RUN_OUTCOMES, outcome.name, outcome.content_class.label)
    return FilterOutcome(
        outcome.name,
        outcome.content_class,
        outcome.harms,
        outcome.error,
        outcome.duration_ms,
        dry_run=True,
    )

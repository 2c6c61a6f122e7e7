"""A verdict: the class of an event's content, its harm IDs, and each filter's outcome.

Classes are ordered: neutral < allowed < prohibited. Any harm makes an outcome
prohibited; a prohibited outcome without harms gets ``org.matrix.msc4456.other``.
The JSON form (``to_json``/``from_json``) is what workers reply over NATS, what Redis
caches and what JetStream carries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import orjson

from warden.policy.harms import OTHER

# The name of the outcome a verdict carries when the event's sender could not be
# verified (a third-party invite not signed by the sender's server, and not vouched for
# by the room's invite): it was judged, but nothing was attributed to the sender.
SENDER_UNVERIFIED = "sender_unverified"


class ContentClass(enum.IntEnum):
    """The ordered content classes; the max over filters wins."""

    NEUTRAL = 0
    ALLOWED = 1
    PROHIBITED = 2

    @property
    def label(self) -> str:
        """``neutral``, ``allowed`` or ``prohibited``."""
        # A lookup: ``name.lower()`` per call showed up in profiles (every outcome of
        # every verdict serialised carries one).
        return _LABELS[self]

    @classmethod
    def from_label(cls, label: str) -> ContentClass:
        """Parse a label; raises ``ValueError`` for anything else."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown content class {label!r}") from None


_LABELS: tuple[str, ...] = tuple(c.name.lower() for c in ContentClass)  # by value


def normalise(
    content_class: ContentClass, harms: list[str] | tuple[str, ...]
) -> tuple[ContentClass, tuple[str, ...]]:
    """Apply the model's rules: harms force prohibited; prohibited needs a harm."""
    if harms:
        return ContentClass.PROHIBITED, tuple(sorted(set(harms)))
    # No harms (most outcomes): nothing to sort. Runs once per filter per event.
    if content_class is ContentClass.PROHIBITED:
        return content_class, (OTHER,)
    return content_class, ()


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    """What one filter said about one event."""

    name: str
    content_class: ContentClass
    harms: tuple[str, ...] = ()
    error: str | None = None  # set when the filter failed or timed out
    duration_ms: float = 0.0
    # The community runs this filter in dry run (``warden.policy.filter_scope``): the
    # outcome is recorded but counted towards neither the verdict nor any side effect.
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d: dict[str, Any] = {
            "name": self.name,
            "class": self.content_class.label,
            "harms": list(self.harms),
            "duration_ms": round(self.duration_ms, 3),
        }
        if self.error is not None:
            d["error"] = self.error
        if self.dry_run:
            d["dry_run"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FilterOutcome:
        """Inverse of ``to_dict``."""
        return cls(
            name=str(d["name"]),
            content_class=ContentClass.from_label(d["class"]),
            harms=tuple(d.get("harms", ())),
            error=d.get("error"),
            duration_ms=float(d.get("duration_ms", 0.0)),
            dry_run=d.get("dry_run") is True,
        )


# The pipeline makes one outcome per filter per event (twenty-odd per event): a frozen
# dataclass's ``__init__`` goes through ``object.__setattr__`` for each field, about 2 µs
# in all; setting the slots directly is a third of that, and the result is the same
# immutable object.
_new_outcome = object.__new__
_set_name, _set_class, _set_harms, _set_error, _set_duration, _set_dry = (
    FilterOutcome.__dict__[f].__set__
    for f in ("name", "content_class", "harms", "error", "duration_ms", "dry_run")
)


def new_outcome(
    name: str,
    content_class: ContentClass,
    harms: tuple[str, ...],
    error: str | None,
    duration_ms: float,
) -> FilterOutcome:
    """``FilterOutcome(name, content_class, harms, error, duration_ms)``, made faster."""
    outcome = _new_outcome(FilterOutcome)
    _set_name(outcome, name)
    _set_class(outcome, content_class)
    _set_harms(outcome, harms)
    _set_error(outcome, error)
    _set_duration(outcome, duration_ms)
    _set_dry(outcome, False)
    return outcome


@dataclass(frozen=True)
class Verdict:
    """The one verdict for an event ID; it never changes once given."""

    event_id: str
    content_class: ContentClass
    harms: tuple[str, ...] = ()
    filters: tuple[FilterOutcome, ...] = ()
    room_id: str = ""
    community_id: str = ""
    sender: str = ""
    event_type: str = ""
    origin: str = ""  # the server whose request caused the first evaluation
    reference_hash: str = ""  # unpadded base64 sha256 of the redacted event
    first_seen_ts: int = 0  # ms
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prohibited(self) -> bool:
        """True when the event must be refused."""
        return self.content_class is ContentClass.PROHIBITED

    @property
    def sender_verified(self) -> bool:
        """False when nothing proved that ``sender`` sent the event: no hellban, no
        frequency count, no redaction, and reports say so."""
        return not any(f.name == SENDER_UNVERIFIED for f in self.filters)

    @cached_property
    def filters_json(self) -> bytes:
        """The ``filters`` array of ``to_json`` as JSON bytes, made once per verdict.

        The reply, the cache, the JetStream message and the table row all carry it; each
        splices these bytes in rather than serialising every outcome again.
        """
        return orjson.dumps([f.to_dict() for f in self.filters])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return self._dict([f.to_dict() for f in self.filters])

    def _dict(self, filters: Any) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "class": self.content_class.label,
            "harms": list(self.harms),
            "filters": filters,
            "room_id": self.room_id,
            "community_id": self.community_id,
            "sender": self.sender,
            "event_type": self.event_type,
            "origin": self.origin,
            "reference_hash": self.reference_hash,
            "first_seen_ts": self.first_seen_ts,
            **({"extra": self.extra} if self.extra else {}),
        }

    def to_json(self) -> bytes:
        """Compact JSON bytes (``orjson.dumps(to_dict())``)."""
        return orjson.dumps(self._dict(orjson.Fragment(self.filters_json)))

    def to_stored_json(self) -> bytes:
        """``to_json`` without ``extra``: what a store that keeps no extras returns."""
        d = self._dict(orjson.Fragment(self.filters_json))
        d.pop("extra", None)
        return orjson.dumps(d)

    def to_json_pair(self) -> tuple[bytes, bytes]:
        """``to_json`` of this verdict without its ``extra``, then with it (equal when it
        has none): what a store that keeps no extras returns, and the full message."""
        d = self._dict(orjson.Fragment(self.filters_json))
        extra = d.pop("extra", None)
        plain = orjson.dumps(d)
        if not extra:
            return plain, plain
        d["extra"] = extra  # last, as in ``to_dict``
        return plain, orjson.dumps(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        """Inverse of ``to_dict``."""
        return cls(
            event_id=str(d["event_id"]),
            content_class=ContentClass.from_label(d["class"]),
            harms=tuple(d.get("harms", ())),
            filters=tuple(FilterOutcome.from_dict(f) for f in d.get("filters", ())),
            room_id=str(d.get("room_id", "")),
            community_id=str(d.get("community_id", "")),
            sender=str(d.get("sender", "")),
            event_type=str(d.get("event_type", "")),
            origin=str(d.get("origin", "")),
            reference_hash=str(d.get("reference_hash", "")),
            first_seen_ts=int(d.get("first_seen_ts", 0)),
            extra=dict(d.get("extra", {})),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Verdict:
        """Parse ``to_json`` output."""
        return cls.from_dict(orjson.loads(data))

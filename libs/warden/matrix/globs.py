"""Matrix globs (``*`` any run of characters, ``?`` exactly one) matched in bounded time.

Policy list rules (``m.policy.rule.*`` ``entity``) are globs written by whoever can send
state into a list room, so the matcher must not let a pattern choose its own cost.
Translating a glob to a backtracking regex (``*`` → ``.*``) does: Python's ``re`` tries
every way to split the value among the stars, about C(n+k-1, k-1) steps for ``k`` stars
against ``n`` characters, so ``"*" * 28 + "§"`` never finishes (review H3).

Here a glob is split at its stars into fixed-length segments. The first segment must
match at the start, the last at the end, and each middle segment is found leftmost after
the previous one: leftmost is always right, because it leaves the most room for the
segments after it. Every step is a ``str`` comparison or ``find`` or, for a segment
with ``?``, a quantifier-free regex (no backtracking choices beyond the start position),
so one match costs O(len(value) * len(glob)) at worst and usually O(len(value)), all in
C. Runs of ``*`` are collapsed first (``**`` means ``*``).

Besides, learners refuse globs that cannot be meant (``glob_rejection``): longer than the
255 bytes a Matrix identifier may have, or with more wildcards than any real rule needs.

``GlobIndex`` matches one value against many globs: globs without wildcards (most rules
of real lists) are one dictionary lookup, the rest are tried one by one.

Measured against google-re2 (``re2.Set`` of all globs) for the policy list filter's
per-event loop (3 000 rules, 10 % with wildcards, niced, 2-core machine): this index
≈155 µs per event, ``re2.Set`` ≈18 µs, the old per-rule ``re`` loop ≈600 µs, per-rule
``re2`` ≈10 ms. ``re2.Set`` is faster, but a set of adversarial globs (``.*ab.{40}.*c.{30}``
and the like) makes ``Set.Compile`` fail past RE2's memory budget, and a DFA that runs
out of memory at match time reports "no match" (the Python binding cannot tell them
apart), so a list room could switch off every ban of a community. This matcher has no
such failure and no new dependency; ``PolicyListFilter`` also remembers recent senders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_GLOB_BYTES = 255
"""Longest glob accepted (UTF-8 bytes, before collapsing stars): the spec's limit on user
IDs, room IDs and (with a port) server names, so a longer glob is junk or an attack."""

MAX_GLOB_WILDCARDS = 32
"""Most wildcards (``?`` and ``*`` after collapsing) a glob may hold. Real rules hold a
few (``@*:*.example.org``); matching cost does not depend on it, the cap keeps junk out."""

REJECT_TOO_LONG = "entity_too_long"
REJECT_TOO_MANY_WILDCARDS = "too_many_wildcards"

_STAR_RUN = re.compile(r"\*{2,}")


def collapse_stars(glob: str) -> str:
    """``glob`` with every run of ``*`` replaced by one ``*`` (the same language)."""
    return _STAR_RUN.sub("*", glob) if "**" in glob else glob


def glob_rejection(glob: str) -> str | None:
    """Why a learner must refuse ``glob`` (a metric label), or None when it is fine."""
    if len(glob) > MAX_GLOB_BYTES or len(glob.encode("utf-8", "surrogatepass")) > MAX_GLOB_BYTES:
        return REJECT_TOO_LONG
    collapsed = collapse_stars(glob)
    if collapsed.count("*") + collapsed.count("?") > MAX_GLOB_WILDCARDS:
        return REJECT_TOO_MANY_WILDCARDS
    return None


class _Segment:
    """A star-free piece of a glob: literal text, or a fixed-length pattern with ``?``."""

    __slots__ = ("length", "literal", "pattern")

    def __init__(self, text: str) -> None:
        self.length = len(text)
        if "?" in text:
            self.literal: str | None = None
            parts = ("." if c == "?" else re.escape(c) for c in text)
            # No quantifier: a match attempt at one position reads at most ``length``
            # characters, so a search is O(len(value) * length).
            self.pattern: re.Pattern[str] | None = re.compile("".join(parts), re.DOTALL)
        else:
            self.literal = text
            self.pattern = None

    def at(self, value: str, pos: int) -> bool:
        """Whether the segment matches ``value`` exactly at ``pos`` (fits before the end)."""
        end = pos + self.length
        if end > len(value):
            return False
        if self.literal is not None:
            return value.startswith(self.literal, pos)
        assert self.pattern is not None
        return self.pattern.match(value, pos, end) is not None

    def find(self, value: str, start: int, end: int) -> int:
        """The end of the leftmost match inside ``value[start:end]``, or -1."""
        if self.literal is not None:
            found = value.find(self.literal, start, end)
            return -1 if found < 0 else found + self.length
        assert self.pattern is not None
        match = self.pattern.search(value, start, end)
        return -1 if match is None else match.end()


class Glob:
    """A compiled Matrix glob; ``matches`` is bounded whatever the glob (module doc)."""

    __slots__ = ("_head", "_middle", "_min_length", "_tail", "source")

    def __init__(self, glob: str) -> None:
        self.source = glob
        parts = collapse_stars(glob).split("*")
        self._head = _Segment(parts[0])
        # One part means no star: the head must then be the whole value.
        self._tail = _Segment(parts[-1]) if len(parts) > 1 else None
        self._middle = tuple(_Segment(p) for p in parts[1:-1] if p)
        self._min_length = sum(len(p) for p in parts)

    @property
    def has_wildcards(self) -> bool:
        """False when the glob is a plain string (it matches only itself)."""
        return self._tail is not None or self._head.literal is None

    def matches(self, value: str) -> bool:
        """Whether the whole of ``value`` matches the glob (case-sensitive)."""
        n = len(value)
        if n < self._min_length or not self._head.at(value, 0):
            return False
        tail = self._tail
        if tail is None:
            return n == self._head.length
        end = n - tail.length
        if not tail.at(value, end):
            return False
        pos = self._head.length
        for segment in self._middle:
            pos = segment.find(value, pos, end)
            if pos < 0:
                return False
        return True


@lru_cache(maxsize=4096)
def compile_glob(glob: str) -> Glob:
    """A compiled glob, cached (rules repeat across lists and reloads)."""
    return Glob(glob)


class GlobIndex(Generic[T]):
    """Many globs, each with a payload; ``first_match`` finds a glob matching a value.

    Globs without wildcards go into a dictionary; the others are tried in order.
    """

    __slots__ = ("_exact", "_wild")

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._exact: dict[str, T] = {}
        self._wild: list[tuple[Glob, T]] = []
        for glob, payload in entries:
            if "*" in glob or "?" in glob:
                self._wild.append((compile_glob(glob), payload))
            else:  # most rules of real lists: nothing to compile
                self._exact.setdefault(glob, payload)

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)

    def first_match(self, value: str) -> T | None:
        """The payload of a glob matching ``value`` (an exact one first), or None."""
        if value in self._exact:
            return self._exact[value]
        for glob, payload in self._wild:
            if glob.matches(value):
                return payload
        return None

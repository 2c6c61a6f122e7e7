"""Matrix globs: the bounded matcher agrees with fnmatch and stays fast on hostile globs."""

from __future__ import annotations

import fnmatch
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from warden.matrix.globs import (
    MAX_GLOB_BYTES,
    MAX_GLOB_WILDCARDS,
    REJECT_TOO_LONG,
    REJECT_TOO_MANY_WILDCARDS,
    Glob,
    GlobIndex,
    collapse_stars,
    glob_rejection,
)

# No "[": fnmatch would read it as a character class, which Matrix globs do not have.
GLOB_ALPHABET = "ab*?.:§\n"
VALUE_ALPHABET = "ab.:§\n*?"


def reference(glob: str, value: str) -> bool:
    """fnmatch's translation to a regex: the semantics Matrix globs share with it."""
    return re.fullmatch(fnmatch.translate(glob), value) is not None


@settings(max_examples=500)
@given(st.text(alphabet=GLOB_ALPHABET, max_size=12), st.text(alphabet=VALUE_ALPHABET, max_size=14))
def test_matcher_agrees_with_fnmatch(glob: str, value: str) -> None:
    assert Glob(glob).matches(value) is reference(glob, value)


@given(
    st.lists(st.text(alphabet=GLOB_ALPHABET, max_size=8), max_size=6),
    st.text(alphabet=VALUE_ALPHABET, max_size=10),
)
def test_index_finds_a_match_exactly_when_some_glob_matches(globs: list[str], value: str) -> None:
    index = GlobIndex((g, i) for i, g in enumerate(globs))
    found = index.first_match(value)
    assert (found is not None) is any(reference(g, value) for g in globs)
    if found is not None:
        assert reference(globs[found], value)


def test_examples() -> None:
    assert Glob("@*:example.org").matches("@alice:example.org")
    assert not Glob("@*:example.org").matches("@alice:example.org.evil")
    assert Glob("*.example.org").matches("a.b.example.org")
    assert not Glob("*.example.org").matches("example.org")
    assert Glob("@spam??:x").matches("@spam42:x")
    assert not Glob("@spam??:x").matches("@spam4:x")
    assert Glob("*").matches("")
    assert Glob("a*a").matches("aa")
    assert not Glob("a*a").matches("a")  # head and tail may not overlap
    assert Glob("literal").matches("literal")
    assert not Glob("literal").has_wildcards
    assert Glob("?").has_wildcards


def test_the_review_glob_is_answered_at_once() -> None:
    # Python's re needs about C(n+27, 27) steps for this against a 30-character sender:
    # the test would never finish with the old translation.
    glob = "*" * 28 + "§"
    assert not Glob(glob).matches("@alice:example.org" * 10)
    assert Glob(glob).matches("@alice:example.org§")
    hostile = "*a" * 16 + "*b"
    assert not Glob(hostile).matches("a" * 255)


def test_collapse_and_caps() -> None:
    assert collapse_stars("a***b**c*") == "a*b*c*"
    assert glob_rejection("@*:example.org") is None
    assert glob_rejection("*" * 28 + "§") is None  # one star once collapsed
    assert glob_rejection("a" * MAX_GLOB_BYTES) is None
    assert glob_rejection("a" * (MAX_GLOB_BYTES + 1)) == REJECT_TOO_LONG
    assert glob_rejection("é" * (MAX_GLOB_BYTES // 2 + 1)) == REJECT_TOO_LONG  # bytes count
    assert glob_rejection("?" * MAX_GLOB_WILDCARDS) is None
    assert glob_rejection("?" * (MAX_GLOB_WILDCARDS + 1)) == REJECT_TOO_MANY_WILDCARDS
    assert glob_rejection("*a" * (MAX_GLOB_WILDCARDS + 1)) == REJECT_TOO_MANY_WILDCARDS

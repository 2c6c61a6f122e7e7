"""The density filter counts whitespace exactly as policyserv's regular expression did."""

from __future__ import annotations

import asyncio
import re
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.filters.filter_helpers import OWN_USER, config, context, message
from warden.filters.base import FilterDeps
from warden.filters.density import DensityFilter
from warden.policy.verdict import ContentClass

# The formula the filter used before (Go RE2 ``\s`` removed with a regular expression).
_OLD_WHITESPACE = re.compile(rb"[\t\n\f\r ]")


def old_density(body: bytes) -> float:
    return len(_OLD_WHITESPACE.sub(b"", body)) / len(body)


def old_prohibits(body: str, min_length: int, max_density: float) -> bool:
    raw = body.encode("utf-8")
    if not raw or len(raw) < min_length:
        return False
    return old_density(raw) >= max_density


# The density filter touches neither store: an unconnected client and no pool will do.
_DEPS = FilterDeps(redis=aioredis.Redis(), pool=cast(asyncpg.Pool, None), local_user_id=OWN_USER)

# Every whitespace the old expression removed, others it kept (vertical tab, NEL,
# no-break and other Unicode spaces), and ordinary text.
_bodies = st.text(
    alphabet=st.sampled_from(list("\t\n\f\r \v\x85\xa0\u2028\u3000abé🙂"))
    | st.characters(exclude_categories=("Cs",)),  # JSON text: no lone surrogates
    max_size=300,
)


def judge(body: str, **cfg: Any) -> ContentClass:
    ctx = context(message(body), _DEPS, config(**cfg))
    return asyncio.run(DensityFilter().check(ctx)).content_class


@settings(max_examples=300, deadline=None)
@given(body=_bodies, min_length=st.integers(0, 200), data=st.data())
@example(body="a" * 190 + " " * 10, min_length=150, data=None)
def test_same_judgement_as_the_regular_expression(
    body: str, min_length: int, data: st.DataObject | None
) -> None:
    raw = body.encode("utf-8")
    exact = old_density(raw) if raw else 0.5
    # Thresholds at the body's exact density (≥ is the rule), just around it, and anywhere.
    candidates = [exact, exact + 1e-9, max(exact - 1e-9, 1e-9), 0.95]
    if data is not None:
        candidates.append(data.draw(st.floats(min_value=1e-6, max_value=1.0)))
    for max_density in candidates:
        expected = old_prohibits(body, min_length, max_density)
        got = judge(
            body,
            density_filter_min_trigger_length=min_length,
            density_filter_max_density=max_density,
        )
        assert got is (ContentClass.PROHIBITED if expected else ContentClass.NEUTRAL)

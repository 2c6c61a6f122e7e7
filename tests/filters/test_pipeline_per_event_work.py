"""Work the pipeline does once rather than per event or per filter, with the results it
always gave: the filters a configuration enables, outcome normalisation, the event's
canonical JSON."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import asyncpg
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.filters.filter_helpers import OWN_USER, config, context, message, new_event_id
from tests.matrix.event_strategies import json_objects
from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.filters.length import LengthFilter
from warden.policy.config import EffectiveConfig
from warden.policy.harms import OTHER
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, normalise

# The canonical JSON needs no store: an unconnected client and no pool will do.
_DEPS = FilterDeps(redis=aioredis.Redis(), pool=cast(asyncpg.Pool, None), local_user_id=OWN_USER)


class Counted(Filter):
    """Enabled by a community key of its own; counts how often it is asked."""

    name = "test_counted"
    group = Group.MAIN
    waits_on_io = False
    asked: ClassVar[int] = 0

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        cls.asked += 1
        return bool(config.get("test_counted_on", False))

    async def check(self, ctx: FilterContext) -> FilterResult:
        return FilterResult.neutral()


async def test_the_filters_a_configuration_enables_are_worked_out_once(deps: FilterDeps) -> None:
    pipeline = Pipeline(deps, timeout_seconds=2, filters=[Counted])
    on, off = config(test_counted_on=True), config(test_counted_on=False)
    Counted.asked = 0

    for _ in range(5):
        v = await pipeline.evaluate(
            message("hi"), event_id=new_event_id(), community_id="default", config=on
        )
        assert [f.name for f in v.filters] == ["test_counted"]
    assert Counted.asked == 1
    # Another configuration object (a changed or reloaded community) is asked again.
    v = await pipeline.evaluate(
        message("hi"), event_id=new_event_id(), community_id="default", config=off
    )
    assert v.filters == ()
    assert Counted.asked == 2


def old_normalise(
    content_class: ContentClass, harms: list[str] | tuple[str, ...]
) -> tuple[ContentClass, tuple[str, ...]]:
    """The rule as it was written before the shortcut for outcomes without harms."""
    unique = tuple(sorted(set(harms)))
    if unique:
        return ContentClass.PROHIBITED, unique
    if content_class is ContentClass.PROHIBITED:
        return content_class, (OTHER,)
    return content_class, ()


@settings(max_examples=300)
@given(
    content_class=st.sampled_from(ContentClass),
    harms=st.lists(st.sampled_from(["a", "b", "org.matrix.msc4456.spam", OTHER]), max_size=4),
    as_tuple=st.booleans(),
)
def test_normalise_is_unchanged(
    content_class: ContentClass, harms: list[str], as_tuple: bool
) -> None:
    given_harms = tuple(harms) if as_tuple else harms
    assert normalise(content_class, given_harms) == old_normalise(content_class, given_harms)


@settings(max_examples=200, deadline=None)
@given(content=json_objects, body=st.text(max_size=50))
def test_the_canonical_event_bytes_are_the_canonical_text_encoded(
    content: dict[str, Any], body: str
) -> None:
    ev = message(body, **{f"x_{k}": v for k, v in content.items()})
    ctx = context(ev, _DEPS)
    assert ctx.event_json_bytes == ctx.event_json.encode("utf-8")
    assert context(ev, _DEPS).event_json == ctx.event_json  # either order, same text


async def test_the_length_filter_counts_canonical_bytes(deps: FilterDeps) -> None:
    ev = message("é" * 100)  # two bytes each
    ctx = context(ev, deps)
    size = len(ctx.event_json.encode("utf-8"))
    at = await LengthFilter().check(context(ev, deps, config(length_filter_max_length=size)))
    over = await LengthFilter().check(context(ev, deps, config(length_filter_max_length=size - 1)))
    assert at.content_class is ContentClass.NEUTRAL
    assert over.content_class is ContentClass.PROHIBITED

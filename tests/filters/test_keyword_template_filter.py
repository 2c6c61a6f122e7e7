"""The keyword-template filter through the pipeline, and the compiled-template cache."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from tests.conftest import NATS_URL
from tests.filters.filter_helpers import config, event, message, new_event_id
from warden.bus.subjects import KEYWORD_TEMPLATES_CHANGED_SUBJECT
from warden.filters.base import FilterDeps
from warden.filters.registry import BY_NAME
from warden.policy.harms import OTHER, SPAM, SPAM_FRAUD
from warden.policy.keyword_template_cache import KeywordTemplateCache
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage import keyword_templates as store

FRAUD_TEMPLATE = (
    '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
    "org.matrix.msc4456.spam.fraud{% endif %}"
)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def stored(pool: asyncpg.Pool, body: str) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    await store.put_template(pool, name, body)
    return name


async def judge(deps: FilterDeps, ev: dict[str, Any], **cfg: Any) -> Verdict:
    pipeline = Pipeline(deps, timeout_seconds=5.0)
    return await pipeline.evaluate(
        ev,
        event_id=new_event_id(),
        community_id="default",
        config=config(hellban_postfilter_minutes=0, **cfg),
    )


def outcome(v: Verdict, name: str = "keyword_template") -> Any:
    return {f.name: f for f in v.filters}[name]


def test_registered_with_policyserv_keys() -> None:
    cls = BY_NAME["keyword_template"]
    assert cls.checks_text and SPAM_FRAUD in cls.harm_ids
    assert not cls.enabled(config())  # empty template list: off by default
    assert not cls.enabled(config(keyword_template_filter_template_names=[""]))
    assert cls.enabled(config(keyword_template_filter_template_names=["x"]))


async def test_templates_prohibit_through_the_pipeline(
    deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    name = await stored(pg_pool, FRAUD_TEMPLATE)
    v = await judge(
        deps, message("Get FREE crypto here"), keyword_template_filter_template_names=[name]
    )
    assert v.content_class is ContentClass.PROHIBITED and v.harms == (SPAM_FRAUD,)
    assert outcome(v).harms == (SPAM_FRAUD,) and outcome(v).error is None

    v = await judge(deps, message("hello"), keyword_template_filter_template_names=[name])
    assert v.content_class is ContentClass.NEUTRAL
    assert outcome(v).content_class is ContentClass.NEUTRAL

    # Only m.room.message, as policyserv.
    other = event("m.sticker", {"body": "free crypto"})
    v = await judge(deps, other, keyword_template_filter_template_names=[name])
    assert outcome(v).content_class is ContentClass.NEUTRAL


async def test_body_raw_is_body_and_formatted_body_or_the_full_event(
    deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    name = await stored(
        pg_pool,
        '{% if StrSliceContains(BodyWords, "<b>bold</b>") %}org.matrix.msc4456.spam{% endif %}'
        '{% if StringContains(BodyRaw, "@alice:example.org") %}'
        "org.matrix.msc4456.harassment{% endif %}",
    )
    ev = message("plain", formatted_body="<b>bold</b>")
    v = await judge(deps, ev, keyword_template_filter_template_names=[name])
    assert outcome(v).harms == (SPAM,)
    # The whole event: the sender is in it; the formatted body is one JSON string.
    v = await judge(
        deps,
        ev,
        keyword_template_filter_template_names=[name],
        keyword_template_filter_use_full_event=True,
    )
    assert outcome(v).harms == ("org.matrix.msc4456.harassment",)


async def test_unknown_harm_ids_are_dropped(deps: FilterDeps, pg_pool: asyncpg.Pool) -> None:
    name = await stored(pg_pool, "org.matrix.msc4456.spam  not.a.harm\n{{ BodyRaw }}")
    before = metric("warden_keyword_template_unknown_harms_total")
    v = await judge(deps, message("made.up"), keyword_template_filter_template_names=[name])
    assert v.harms == (SPAM,)
    # "not.a.harm" and the body's "made.up".
    assert metric("warden_keyword_template_unknown_harms_total") == before + 2

    only_unknown = await stored(pg_pool, "org.example.invented")
    v = await judge(deps, message("x"), keyword_template_filter_template_names=[only_unknown])
    assert v.content_class is ContentClass.NEUTRAL


async def test_several_templates_union_and_missing_ones_are_skipped(
    deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    fraud = await stored(pg_pool, FRAUD_TEMPLATE)
    spam = await stored(pg_pool, "org.matrix.msc4456.spam org.matrix.msc4456.spam.fraud")
    before = metric("warden_keyword_template_missing_total")
    v = await judge(
        deps,
        message("free crypto"),
        keyword_template_filter_template_names=[fraud, "no-such-template", spam],
    )
    assert set(v.harms) == {SPAM, SPAM_FRAUD}
    assert metric("warden_keyword_template_missing_total") == before + 1


@pytest.mark.parametrize("fail_secure", [True, False])
async def test_a_template_over_its_bounds_is_a_filter_error(
    deps: FilterDeps, pg_pool: asyncpg.Pool, fail_secure: bool
) -> None:
    name = await stored(
        pg_pool, "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}"
    )
    labels = {"reason": "limit"}
    before = metric("warden_keyword_template_render_failures_total", labels)
    v = await judge(
        deps,
        message("x"),
        keyword_template_filter_template_names=[name],
        keyword_template_fail_secure=fail_secure,
    )
    assert outcome(v).error is not None and "loop iterations" in outcome(v).error
    assert metric("warden_keyword_template_render_failures_total", labels) == before + 1
    if fail_secure:
        assert v.content_class is ContentClass.PROHIBITED and v.harms == (OTHER,)
    else:
        assert v.content_class is ContentClass.NEUTRAL


async def test_a_stored_template_that_does_not_compile_never_runs(
    deps: FilterDeps, pg_pool: asyncpg.Pool
) -> None:
    # As an import from policyserv could leave it: written past the admin API's check.
    name = await stored(pg_pool, "{{ .BodyRaw }}")
    before = metric("warden_keyword_template_load_failures_total")
    v = await judge(deps, message("x"), keyword_template_filter_template_names=[name])
    assert outcome(v).content_class is ContentClass.NEUTRAL and outcome(v).error is None
    assert metric("warden_keyword_template_load_failures_total") >= before + 1


async def wait_for(condition: Any) -> None:
    """Poll until ``condition()``; the bound only keeps a lost message from hanging."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_caches_reload_on_notification_and_periodically(
    pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    other = await nats.connect(NATS_URL)
    caches = [KeywordTemplateCache(pg_pool), KeywordTemplateCache(pg_pool)]
    try:
        await caches[0].subscribe(nats_client)
        await caches[1].subscribe(other)
        await other.flush()
        name = await stored(pg_pool, "one")
        for cache in caches:
            assert [t.source for t in await cache.templates([name])] == ["one"]

        await store.put_template(pg_pool, name, "two")
        await nats_client.publish(KEYWORD_TEMPLATES_CHANGED_SUBJECT, orjson.dumps({"name": name}))
        for cache in caches:
            await wait_for(lambda c=cache: (t := c.get(name)) is not None and t.source == "two")

        await store.delete_template(pg_pool, name)
        await nats_client.publish(KEYWORD_TEMPLATES_CHANGED_SUBJECT, orjson.dumps({"name": name}))
        for cache in caches:
            await wait_for(lambda c=cache: c.get(name) is None)

        # Without a notification, the periodic reload catches up.
        periodic = KeywordTemplateCache(pg_pool, reload_interval_seconds=0.05)
        assert await periodic.templates([name]) == []
        await store.put_template(pg_pool, name, "three")
        stopping = asyncio.Event()
        task = asyncio.create_task(periodic.run(stopping))
        await wait_for(lambda: (t := periodic.get(name)) is not None and t.source == "three")
        stopping.set()
        await task
    finally:
        for cache in caches:
            await cache.unsubscribe()
        await other.close()

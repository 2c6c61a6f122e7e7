"""The openai_filter filter against a real local OpenAI-compatible moderation server.

The server (uvicorn in a thread, ``tests.local_servers``) answers ``POST
/v1/moderations`` as the test tells it: a result, an error status, a body that is not a
result, or nothing until the test releases it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from tests.filters.filter_helpers import ALICE, ROOM, config, context, event, message, new_event_id
from tests.filters.moderation_service import (
    API_KEY,
    MODEL,
    OTHER_ROOM,
    ROOMS_ENV,
    Moderations,
    settings_for,
)
from tests.filters.moderation_service import service as service  # a fixture
from tests.local_servers import ThreadedServer
from warden.filters.base import FilterDeps
from warden.filters.openai_moderation import OpenAIModerationFilter, renderings
from warden.filters.registry import BY_NAME
from warden.openai_moderation import REQUESTS, OpenAIModeration
from warden.policy.config import ConfigError, EffectiveConfig, validate_community_config
from warden.policy.dependency_failures import DependencyUnavailable, EvaluationUnavailable
from warden.policy.harms import CHILD_SAFETY_CSAM, SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.settings import Settings


@pytest.fixture
async def client(
    service: tuple[Moderations, ThreadedServer],
) -> AsyncIterator[OpenAIModeration]:
    made = OpenAIModeration.from_settings(settings_for(service[1]))
    assert made is not None
    yield made
    await made.aclose()


def with_client(deps: FilterDeps, client: OpenAIModeration) -> FilterDeps:
    deps.openai_moderation = client
    return deps


def allowed_config(**community: Any) -> EffectiveConfig:
    return config(ROOMS_ENV, **community)


async def judge(p: Pipeline, ev: dict[str, Any], cfg: EffectiveConfig | None = None) -> Verdict:
    return await p.evaluate(
        ev, event_id=new_event_id(), community_id="default", config=cfg or allowed_config()
    )


def outcome(v: Verdict) -> Any:
    return next(f for f in v.filters if f.name == "openai_filter")


def count(label: str) -> float:
    return REQUESTS.labels(label)._value.get()


async def until(predicate: Any) -> None:
    """Wait (without a deadline of our own: pytest's timeout bounds it) for ``predicate``."""
    while not predicate():
        await asyncio.sleep(0.01)


def test_registered_with_policyservs_fail_secure_key() -> None:
    assert BY_NAME["openai_filter"] is OpenAIModerationFilter
    cfg = config({"PS_OPENAI_FILTER_FAIL_SECURE": "false"})
    assert OpenAIModerationFilter.fail_secure(cfg) is False
    assert OpenAIModerationFilter.fail_secure(config()) is True
    # A community may set the fail-secure key, never the rooms (instance only).
    assert validate_community_config({"openai_filter_fail_secure": False})
    with pytest.raises(ConfigError):
        validate_community_config({"openai_filter_allowed_room_ids": [OTHER_ROOM]})
    assert not OpenAIModerationFilter.enabled(config())
    assert OpenAIModerationFilter.enabled(allowed_config())


def test_renderings(deps: FilterDeps) -> None:
    def texts(ev: dict[str, Any]) -> list[str]:
        return renderings(context(ev, deps))

    assert texts(message("hello")) == [f"{ALICE} says: hello"]
    assert texts(message("hi", "m.notice", formatted_body="<b>hi</b>")) == [
        f"{ALICE} says: hi",
        f"{ALICE} says: <b>hi</b>",
    ]
    assert texts(message("waves", "m.emote")) == [f"{ALICE} says: /me waves"]
    reaction = event("m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "key": "🍆"}})
    assert texts(reaction) == [f"{ALICE} reacted with 🍆"]
    assert texts(message("cat.png", "m.image", url="mxc://x/y")) == []
    assert texts(event("m.room.topic", {"topic": "hello"}, state_key="")) == []


async def test_flagged_is_refused_as_spam_with_model_and_key_sent(
    deps: FilterDeps,
    client: OpenAIModeration,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, _ = service
    moderations.flagged = True
    moderations.categories = {"harassment": True, "sexual/minors": False}
    verdict = await judge(Pipeline(with_client(deps, client), timeout_seconds=10), message("you"))
    assert outcome(verdict).error is None
    assert verdict.content_class is ContentClass.PROHIBITED
    assert verdict.harms == (SPAM,)
    assert outcome(verdict).harms == (SPAM,)
    [(path, headers, body)] = moderations.received
    assert path == "/v1/moderations"
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert body == {"model": MODEL, "input": f"{ALICE} says: you"}


async def test_sexual_minors_adds_csam(
    deps: FilterDeps,
    client: OpenAIModeration,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, _ = service
    moderations.flagged = True
    moderations.categories = {"sexual": True, "sexual/minors": True}
    verdict = await judge(Pipeline(with_client(deps, client), timeout_seconds=10), message("x"))
    assert verdict.content_class is ContentClass.PROHIBITED
    assert set(verdict.harms) == {SPAM, CHILD_SAFETY_CSAM}


async def test_not_flagged_is_neutral_and_each_rendering_is_sent(
    deps: FilterDeps,
    client: OpenAIModeration,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, _ = service
    before = count("not_flagged")
    ev = message("nice day", formatted_body="<i>nice day</i>")
    verdict = await judge(Pipeline(with_client(deps, client), timeout_seconds=10), ev)
    assert verdict.content_class is ContentClass.NEUTRAL
    assert outcome(verdict).content_class is ContentClass.NEUTRAL
    assert sorted(b["input"] for _, _, b in moderations.received) == [
        f"{ALICE} says: <i>nice day</i>",
        f"{ALICE} says: nice day",
    ]
    assert count("not_flagged") == before + 2


async def test_rooms_not_allowed_and_filter_conditions_are_not_sent(
    deps: FilterDeps,
    client: OpenAIModeration,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, _ = service
    moderations.flagged = True
    p = Pipeline(with_client(deps, client), timeout_seconds=10)
    other = event("m.room.message", {"msgtype": "m.text", "body": "x"}, room_id=OTHER_ROOM)
    assert (await judge(p, other)).content_class is ContentClass.NEUTRAL
    # No room listed: the filter is off for every community.
    off = await judge(p, message("x"), config())
    assert off.content_class is ContentClass.NEUTRAL
    assert "openai_filter" not in {f.name for f in off.filters}
    # A community narrows it with filter_conditions like any filter.
    narrowed = allowed_config(filter_conditions={"openai_filter": {"not_room_ids": [ROOM]}})
    assert (await judge(p, message("x"), narrowed)).content_class is ContentClass.NEUTRAL
    assert moderations.received == []
    # And the listed room is judged (the same flagged answer refuses it).
    assert (await judge(p, message("x"))).content_class is ContentClass.PROHIBITED
    assert len(moderations.received) == 1


@pytest.mark.parametrize(
    ("status", "raw_body", "label"),
    [
        (429, None, "rate_limited"),
        (500, None, "server_error"),
        (503, None, "server_error"),
        (401, None, "rejected"),
        (200, b"<html>not json</html>", "bad_response"),
        (200, b'{"results": []}', "bad_response"),
    ],
)
async def test_service_failures_are_not_verdicts(
    deps: FilterDeps,
    client: OpenAIModeration,
    service: tuple[Moderations, ThreadedServer],
    caplog: pytest.LogCaptureFixture,
    status: int,
    raw_body: bytes | None,
    label: str,
) -> None:
    moderations, _ = service
    moderations.status = status
    moderations.raw_body = raw_body
    caplog.set_level(logging.DEBUG)
    before = count(label)
    p = Pipeline(with_client(deps, client), timeout_seconds=10)
    # fail-secure (the default): no verdict at all, the event is judged again later.
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, message("hello"))
    assert raised.value.filter_name == "openai_filter"
    assert count(label) == before + 1
    # openai_filter_fail_secure false: the filter counts as neutral, the error recorded.
    verdict = await judge(p, message("hello"), allowed_config(openai_filter_fail_secure=False))
    assert verdict.content_class is ContentClass.NEUTRAL
    assert outcome(verdict).error
    # The key is never logged nor recorded, even when the service's answer quotes it.
    assert API_KEY not in caplog.text
    assert API_KEY not in str(outcome(verdict).error)
    assert API_KEY not in repr(client)
    assert len(moderations.received) == 2


async def test_slow_service_times_out_into_no_verdict(
    deps: FilterDeps, service: tuple[Moderations, ThreadedServer]
) -> None:
    moderations, server = service
    moderations.hold = threading.Event()
    slow = OpenAIModeration.from_settings(settings_for(server, openai_filter_timeout_seconds=0.2))
    assert slow is not None
    before = count("timeout")
    try:
        p = Pipeline(with_client(deps, slow), timeout_seconds=10)
        with pytest.raises(EvaluationUnavailable):
            await judge(p, message("hello"))
    finally:
        moderations.hold.set()
        await slow.aclose()
    assert count("timeout") == before + 1


async def test_slow_classifier_does_not_hold_up_other_events(
    deps: FilterDeps,
    service: tuple[Moderations, ThreadedServer],
) -> None:
    """While the service holds a request open, events of rooms it does not judge are
    judged, and an event of a listed room beyond the concurrency cap fails at once."""
    moderations, server = service
    moderations.hold = threading.Event()
    capped = OpenAIModeration.from_settings(settings_for(server, openai_filter_max_concurrency=1))
    assert capped is not None
    p = Pipeline(with_client(deps, capped), timeout_seconds=30)
    try:
        held = asyncio.create_task(judge(p, message("first")))
        await until(lambda: moderations.held == 1)

        others = [
            event("m.room.message", {"msgtype": "m.text", "body": f"m{i}"}, room_id=OTHER_ROOM)
            for i in range(20)
        ]
        verdicts = await asyncio.gather(*(judge(p, ev) for ev in others))
        assert all(v.content_class is ContentClass.NEUTRAL for v in verdicts)

        before = count("saturated")
        with pytest.raises(EvaluationUnavailable) as raised:
            await judge(p, message("second"))
        assert "already being classified" in raised.value.error
        assert count("saturated") == before + 1

        # All of that happened while the first request was still held open.
        assert not held.done()
        assert moderations.held == 1
        assert len(moderations.received) == 1
    finally:
        moderations.hold.set()
    assert (await held).content_class is ContentClass.NEUTRAL
    assert capped.in_flight == 0
    await capped.aclose()


async def test_ssrf_guard_applies_unless_the_network_is_allowed(
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, server = service
    guarded = OpenAIModeration.from_settings(
        settings_for(server, openai_filter_allowed_networks=[])
    )
    assert guarded is not None
    before = count("denied")
    try:
        with pytest.raises(DependencyUnavailable, match="network guard"):
            await guarded.moderate(["hello"])
    finally:
        await guarded.aclose()
    assert count("denied") == before + 1
    assert moderations.received == []


def test_settings(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert OpenAIModeration.from_settings(Settings()) is None  # no key: off
    defaults = Settings()
    assert defaults.openai_filter_base_url == "https://api.openai.com/v1"
    assert defaults.openai_filter_model == "omni-moderation-latest"
    assert API_KEY not in repr(Settings(openai_filter_api_key=API_KEY))

    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    from_file = OpenAIModeration.from_settings(Settings(openai_filter_api_key_file=str(key_file)))
    assert from_file is not None
    assert from_file._api_key == API_KEY
    with pytest.raises(ValueError, match="not both"):
        OpenAIModeration.from_settings(
            Settings(openai_filter_api_key="x", openai_filter_api_key_file=str(key_file))
        )

    with pytest.raises(ValidationError):
        Settings(openai_filter_api_key_file=str(tmp_path / "missing"))
    for bad in ("ftp://models.example/v1", "https://user:pw@models.example/v1", "nope"):
        with pytest.raises(ValidationError):
            Settings(openai_filter_base_url=bad)
    with pytest.raises(ValidationError):
        Settings(openai_filter_allowed_networks=["10.0.0.0/33"])
    monkeypatch.setenv("PS_OPENAI_FILTER_ALLOWED_NETWORKS", "127.0.0.1/32,10.1.0.0/16")
    assert Settings().openai_filter_allowed_networks == ["127.0.0.1/32", "10.1.0.0/16"]


def test_policyservs_openai_settings_are_read_not_warned_about() -> None:
    from warden.policyserv_settings import ignored_settings_in

    env = {
        "PS_OPENAI_FILTER_API_KEY": API_KEY,
        "PS_OPENAI_FILTER_ALLOWED_ROOM_IDS": ROOM,
        "PS_OPENAI_FILTER_FAIL_SECURE": "false",
    }
    assert ignored_settings_in(env) == []
    cfg = config(env)
    assert cfg["openai_filter_allowed_room_ids"] == [ROOM]
    assert cfg["openai_filter_fail_secure"] is False


async def test_any_base_url_path_and_host_header(
    service: tuple[Moderations, ThreadedServer],
) -> None:
    moderations, server = service
    custom = OpenAIModeration.from_settings(
        settings_for(server, openai_filter_base_url=f"{server.base_url}/proxy/openai/v1/")
    )
    assert custom is not None
    try:
        [result] = await custom.moderate(["hello"])
    finally:
        await custom.aclose()
    assert not result.flagged
    [(path, headers, body)] = moderations.received
    assert path == "/proxy/openai/v1/moderations"
    assert headers["host"] == server.address
    assert body == {"model": MODEL, "input": "hello"}

"""What filters see (review H5) and what they may do to a sender nobody verified (H2),
through the real pipeline on real Redis and PostgreSQL."""

from __future__ import annotations

import uuid

from tests.filters.filter_helpers import config, event, message, new_event_id
from warden import redis_keys
from warden.filters.base import FilterDeps
from warden.policy.config import EffectiveConfig
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import SENDER_UNVERIFIED, ContentClass, Verdict


def user() -> str:
    return f"@u{uuid.uuid4().hex[:10]}:example.org"


async def judge(
    deps: FilterDeps,
    ev: dict[str, object],
    cfg: EffectiveConfig | None = None,
    *,
    sender_verified: bool = True,
    event_id: str | None = None,
) -> Verdict:
    return await Pipeline(deps, timeout_seconds=2).evaluate(
        ev,
        event_id=event_id or new_event_id(),
        community_id="default",
        config=cfg or config(),
        sender_verified=sender_verified,
    )


def outcome(v: Verdict, name: str) -> ContentClass:
    return next(f.content_class for f in v.filters if f.name == name)


async def test_filters_never_see_unsigned_or_signatures(deps: FilterDeps) -> None:
    ev = message("hello")
    ev["unsigned"] = {"age_ts": 1, "pad": "spam " * 3000}
    ev["signatures"] = {"junk.example": {"ed25519:x": "spam " * 3000}}
    cfg = config(keyword_filter_use_full_event=True)

    v = await judge(deps, ev, cfg)

    assert v.content_class is ContentClass.NEUTRAL, v.filters
    assert outcome(v, "length") is ContentClass.NEUTRAL
    assert outcome(v, "keyword") is ContentClass.NEUTRAL
    assert "unsigned" in ev and "signatures" in ev  # the caller's event is left alone
    # The same words in the signed part are still found.
    v = await judge(deps, message("spam " * 3000), cfg)
    assert v.prohibited and outcome(v, "length") is ContentClass.PROHIBITED


async def test_unverified_sender_is_not_hellbanned_and_the_verdict_says_so(
    deps: FilterDeps,
) -> None:
    victim = user()
    ev = event("m.room.message", {"msgtype": "m.text", "body": "spam"}, sender=victim)

    v = await judge(deps, ev, sender_verified=False)

    assert v.prohibited and v.sender == victim
    assert not v.sender_verified
    assert outcome(v, SENDER_UNVERIFIED) is ContentClass.NEUTRAL
    assert not await deps.redis.exists(redis_keys.hellban("default", victim))
    # Verified, the same event hellbans its sender.
    v = await judge(deps, ev)
    assert v.sender_verified and SENDER_UNVERIFIED not in {f.name for f in v.filters}
    assert await deps.redis.exists(redis_keys.hellban("default", victim))


async def test_unverified_sender_fills_no_frequency_window(deps: FilterDeps) -> None:
    victim = user()
    cfg = config(frequency_filter_rate_limit=0.01)  # more than 0.6 events a minute
    key = redis_keys.frequency("frequency", "default", victim)
    for _ in range(3):
        v = await judge(deps, message("hello") | {"sender": victim}, cfg, sender_verified=False)
        assert outcome(v, "frequency") is ContentClass.NEUTRAL
    assert not await deps.redis.exists(key)
    v = await judge(deps, message("hello") | {"sender": victim}, cfg)
    assert await deps.redis.zcard(key) == 1


async def test_unverified_sender_gets_no_allow_list(deps: FilterDeps) -> None:
    admin = user()
    cfg = config(sender_prefilter_allowed_senders=[admin], hellban_postfilter_minutes=0)
    ev = event("m.room.message", {"msgtype": "m.text", "body": "spam"}, sender=admin)

    assert (await judge(deps, ev, cfg)).content_class is ContentClass.ALLOWED
    v = await judge(deps, ev, cfg, sender_verified=False)
    assert outcome(v, "sender_prefilter") is ContentClass.NEUTRAL
    assert v.prohibited

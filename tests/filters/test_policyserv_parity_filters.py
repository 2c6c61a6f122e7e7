"""The filters added for policyserv parity (reference §3.3), each at its boundaries.

Unsafe signing key, inline emoji size, sticky events, links, user ID words and length;
the mention frequency filter, with real Redis, is in ``test_mention_frequency.py``.
"""

from __future__ import annotations

from typing import Any

import nacl.signing
import pytest
import redis.asyncio as aioredis

from tests.filters.filter_helpers import ALICE, config, context, event, message, new_event_id
from warden import redis_keys
from warden.filters.base import Filter, FilterContext, FilterDeps
from warden.filters.inline_emoji_size import InlineEmojiSizeFilter
from warden.filters.link import LinkFilter, star_glob_matches
from warden.filters.registry import BY_NAME
from warden.filters.sticky_events import StickyEventsFilter
from warden.filters.unsafe_signing_key import UnsafeSigningKeyFilter
from warden.filters.user_id_contains_words import UserIdContainsWordsFilter
from warden.filters.user_id_length import UserIdLengthFilter
from warden.matrix.event_signing import sign_event
from warden.matrix.room_versions import get_room_version
from warden.policy.config import EffectiveConfig
from warden.policy.harms import OTHER, SPAM, SPAM_FLOODING, SPEC_NON_COMPLIANCE
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass

N = ContentClass.NEUTRAL
P = ContentClass.PROHIBITED

Case = tuple[str, type[Filter], dict[str, Any], dict[str, Any], ContentClass, tuple[str, ...]]


def _html(formatted: str, event_type: str = "m.room.message") -> dict[str, Any]:
    return event(
        event_type,
        {
            "msgtype": "m.text",
            "body": "x",
            "format": "org.matrix.custom.html",
            "formatted_body": formatted,
        },
    )


def _sticky(duration: Any, ts: int, field: str = "sticky") -> dict[str, Any]:
    ev = message("call member")
    ev[field] = {"duration_ms": duration}
    ev["origin_server_ts"] = ts
    return ev


NOW = 1_000_000_000
HOUR = 3_600_000
EMOJI = '<img data-mx-emoticon src="mxc://a/b" height="{}" alt=":x:">'

CASES: list[Case] = [
    # inline emoji: every <img> an emoticon with one digits-only height ≤ max (32)
    ("emoji at max", InlineEmojiSizeFilter, _html(EMOJI.format(32)), {}, N, ()),
    (
        "emoji over max",
        InlineEmojiSizeFilter,
        _html(EMOJI.format(33)),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "emoji custom max",
        InlineEmojiSizeFilter,
        _html(EMOJI.format(40)),
        {"inline_emoji_size_filter_max_height_pixels": 40},
        N,
        (),
    ),
    (
        "emoji px unit",
        InlineEmojiSizeFilter,
        _html(EMOJI.format("32px")),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "emoji negative",
        InlineEmojiSizeFilter,
        _html(EMOJI.format(-1)),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "emoji two heights",
        InlineEmojiSizeFilter,
        _html('<img data-mx-emoticon height="8" height="8" src="mxc://a/b">'),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "emoji without height",
        InlineEmojiSizeFilter,
        _html('<img data-mx-emoticon src="mxc://a/b">'),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "inline image not emoji",
        InlineEmojiSizeFilter,
        _html('<p>hi <img height="8" src="mxc://a/b"></p>'),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "emoji upper case, self-closing",
        InlineEmojiSizeFilter,
        _html('<IMG DATA-MX-EMOTICON HEIGHT=8 SRC="mxc://a/b"/> and <b>text</b>'),
        {},
        N,
        (),
    ),
    (
        "one bad image of two",
        InlineEmojiSizeFilter,
        _html(EMOJI.format(8) + '<img src="mxc://a/c">'),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    ("no image", InlineEmojiSizeFilter, _html("<b>imgur</b> &lt;img&gt;"), {}, N, ()),
    (
        "emoji not a message",
        InlineEmojiSizeFilter,
        _html('<img src="mxc://a/b">', "m.notice.custom"),
        {},
        N,
        (),
    ),
    # A tokenizer, not a substring search: markup that is not an <img> tag is no image.
    (
        "img in an attribute value",
        InlineEmojiSizeFilter,
        _html('<a title="<img src=x>">link</a>'),
        {},
        N,
        (),
    ),
    ("img in a comment", InlineEmojiSizeFilter, _html("<!-- <img src=x> --> hi"), {}, N, ()),
    ("img tag cut off", InlineEmojiSizeFilter, _html('hi <img src="x'), {}, N, ()),
    (
        "height as entities",
        InlineEmojiSizeFilter,
        _html('<img data-mx-emoticon height="&#51;&#51;">'),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    (
        "height unquoted",
        InlineEmojiSizeFilter,
        _html("<img height=33 data-mx-emoticon>"),
        {},
        P,
        (SPAM, SPEC_NON_COMPLIANCE),
    ),
    # Inputs that make Python's HTMLParser quadratic are read once here.
    ("many <img without a tag", InlineEmojiSizeFilter, _html("<img" * 15000), {}, N, ()),
    ("many emoji", InlineEmojiSizeFilter, _html(EMOJI.format(1) * 1500), {}, N, ()),
    # sticky events (MSC4354), when not allowed: sticky while min(ts, now) + 1 h max > now
    (
        "sticky",
        StickyEventsFilter,
        _sticky(1000, NOW),
        {"sticky_events_filter_allow_sticky_events": False},
        P,
        (OTHER,),
    ),
    (
        "sticky unstable field",
        StickyEventsFilter,
        _sticky(1000, NOW, "msc4354_sticky"),
        {"sticky_events_filter_allow_sticky_events": False},
        P,
        (OTHER,),
    ),
    (
        "sticky clamped to an hour, ended",
        StickyEventsFilter,
        _sticky(10 * HOUR, NOW - HOUR),
        {"sticky_events_filter_allow_sticky_events": False},
        N,
        (),
    ),
    (
        "sticky clamped to an hour, 1 ms left",
        StickyEventsFilter,
        _sticky(10 * HOUR, NOW - HOUR + 1),
        {"sticky_events_filter_allow_sticky_events": False},
        P,
        (OTHER,),
    ),
    (
        "sticky from the future starts now",
        StickyEventsFilter,
        _sticky(1, NOW + HOUR),
        {"sticky_events_filter_allow_sticky_events": False},
        P,
        (OTHER,),
    ),
    (
        "sticky zero duration",
        StickyEventsFilter,
        _sticky(0, NOW),
        {"sticky_events_filter_allow_sticky_events": False},
        N,
        (),
    ),
    (
        "not sticky",
        StickyEventsFilter,
        message("hi"),
        {"sticky_events_filter_allow_sticky_events": False},
        N,
        (),
    ),
    (
        "sticky duration not a number",
        StickyEventsFilter,
        _sticky("1000", NOW),
        {"sticky_events_filter_allow_sticky_events": False},
        N,
        (),
    ),
    # links: deny globs first, then a set allow list must match; * is the only wildcard
    (
        "denied link",
        LinkFilter,
        message("see https://evil.example/x now"),
        {"link_filter_denied_url_globs": ["https://evil.example/*"]},
        P,
        (SPAM,),
    ),
    (
        # In the content's JSON a quote is escaped, so the URL keeps the backslash (as
        # policyserv, which searches the raw JSON): an exact glob no longer matches.
        "url before a quote keeps the escape",
        LinkFilter,
        message('"https://a.example/x"'),
        {"link_filter_denied_url_globs": ["https://a.example/x"]},
        N,
        (),
    ),
    (
        "link not denied",
        LinkFilter,
        message("see https://good.example/x"),
        {"link_filter_denied_url_globs": ["https://evil.example/*"]},
        N,
        (),
    ),
    (
        "link not allowed",
        LinkFilter,
        message("see http://other.example"),
        {"link_filter_allowed_url_globs": ["https://good.example/*"]},
        P,
        (SPAM,),
    ),
    (
        "link allowed",
        LinkFilter,
        message("see https://good.example/a?b=c"),
        {"link_filter_allowed_url_globs": ["https://good.example/*"]},
        N,
        (),
    ),
    (
        "deny wins over allow",
        LinkFilter,
        message("https://good.example/evil"),
        {"link_filter_allowed_url_globs": ["*"], "link_filter_denied_url_globs": ["*evil*"]},
        P,
        (SPAM,),
    ),
    (
        "? is literal",
        LinkFilter,
        message("https://a.example/ax"),
        {"link_filter_denied_url_globs": ["https://a.example/?x"]},
        N,
        (),
    ),
    (
        "? matches itself",
        LinkFilter,
        message("https://a.example/?x"),
        {"link_filter_denied_url_globs": ["https://a.example/?x"]},
        P,
        (SPAM,),
    ),
    (
        "url ends at a space or <",
        LinkFilter,
        message("<https://a.example/x> and https://a.example/x more"),
        {"link_filter_denied_url_globs": ["https://a.example/x"]},
        P,
        (SPAM,),
    ),
    (
        "link in another content key",
        LinkFilter,
        event("m.room.topic", {"topic": "join https://evil.example"}, state_key=""),
        {"link_filter_denied_url_globs": ["https://evil.example"]},
        P,
        (SPAM,),
    ),
    (
        "no scheme, no url",
        LinkFilter,
        message("evil.example/x"),
        {"link_filter_allowed_url_globs": ["https://good.example/*"]},
        N,
        (),
    ),
    # user ID words: [A-Za-z0-9]+ runs in the localpart > max
    (
        "words at max",
        UserIdContainsWordsFilter,
        event(sender="@buy.cheap:many.dotted.server.example"),
        {"user_id_contains_words_filter_max_words": 2},
        N,
        (),
    ),
    (
        "words over max",
        UserIdContainsWordsFilter,
        event(sender="@buy.cheap_pills:example.org"),
        {"user_id_contains_words_filter_max_words": 2},
        P,
        (SPAM_FLOODING,),
    ),
    (
        "non-ascii splits words",
        UserIdContainsWordsFilter,
        event(sender="@aé1b:example.org"),
        {"user_id_contains_words_filter_max_words": 1},
        P,
        (SPAM_FLOODING,),
    ),
    # user ID length: bytes of the sender > max (len("@alice:example.org") == 18)
    (
        "user ID at max",
        UserIdLengthFilter,
        event(),
        {"user_id_length_filter_max_length": 18},
        N,
        (),
    ),
    (
        "user ID over max",
        UserIdLengthFilter,
        event(),
        {"user_id_length_filter_max_length": 17},
        P,
        (SPAM_FLOODING,),
    ),
    (
        "user ID bytes, not characters",
        UserIdLengthFilter,
        event(sender="@é:example.org"),
        {"user_id_length_filter_max_length": 14},
        P,
        (SPAM_FLOODING,),
    ),
]


@pytest.mark.parametrize(
    ("label", "filter_cls", "ev", "overrides", "expected_class", "expected_harms"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_filter_case(
    deps: FilterDeps,
    label: str,
    filter_cls: type[Filter],
    ev: dict[str, Any],
    overrides: dict[str, Any],
    expected_class: ContentClass,
    expected_harms: tuple[str, ...],
) -> None:
    cfg = config(**overrides)
    assert filter_cls.enabled(cfg)
    result = await filter_cls().check(context(ev, deps, cfg, now_ms=NOW))
    assert result.content_class is expected_class
    assert tuple(sorted(result.harms)) == tuple(sorted(expected_harms))
    assert set(result.harms) <= set(filter_cls.harm_ids)


@pytest.mark.parametrize(
    ("name", "overrides", "enabled"),
    [
        ("unsafe_signing_key", {}, True),
        ("unsafe_signing_key", {"unsafe_signing_key_filter_enabled": False}, False),
        ("inline_emoji_size", {}, True),
        ("inline_emoji_size", {"inline_emoji_size_filter_max_height_pixels": 0}, True),
        ("sticky_events", {}, False),
        ("sticky_events", {"sticky_events_filter_allow_sticky_events": False}, True),
        ("link", {}, False),
        ("link", {"link_filter_allowed_url_globs": ["x"]}, True),
        ("link", {"link_filter_denied_url_globs": ["x"]}, True),
        ("user_id_contains_words", {}, False),
        ("user_id_contains_words", {"user_id_contains_words_filter_max_words": -1}, False),
        ("user_id_contains_words", {"user_id_contains_words_filter_max_words": 1}, True),
        ("user_id_length", {}, False),
        ("user_id_length", {"user_id_length_filter_max_length": 1}, True),
        ("mention_frequency", {}, False),
        ("mention_frequency", {"mention_frequency_filter_rate_limit": 0.01}, True),
    ],
)
def test_enable_rules(name: str, overrides: dict[str, Any], enabled: bool) -> None:
    assert BY_NAME[name].enabled(config(**overrides)) is enabled


def test_instance_defaults_come_from_ps_variables() -> None:
    env = {
        "PS_LINK_FILTER_DENIED_URL_GLOBS": "https://a.example/*, https://b.example/*",
        "PS_UNSAFE_SIGNING_KEY_FILTER_ENABLED": "false",
        "PS_USER_ID_LENGTH_FILTER_MAX_LENGTH": "40",
        "PS_MENTION_FREQUENCY_FILTER_RATE_LIMIT": "0.5",
    }
    cfg = config(env)
    assert cfg.get_list("link_filter_denied_url_globs") == [
        "https://a.example/*",
        "https://b.example/*",
    ]
    assert not UnsafeSigningKeyFilter.enabled(cfg)
    assert cfg.get_int("user_id_length_filter_max_length") == 40
    # A community's stored false wins over the instance's true (not so in policyserv).
    assert not UnsafeSigningKeyFilter.enabled(config(unsafe_signing_key_filter_enabled=False))
    assert UnsafeSigningKeyFilter.enabled(config(env, unsafe_signing_key_filter_enabled=True))


def test_link_filter_checks_text_and_globs_are_go_glob() -> None:
    assert LinkFilter.checks_text and not LinkFilter.waits_on_io
    assert star_glob_matches("*", "")
    assert star_glob_matches("", "") and not star_glob_matches("", "a")
    assert star_glob_matches("a*b*c", "aXbYc") and not star_glob_matches("a*b*c", "aXcYb")
    assert not star_glob_matches("a*ab", "ab")  # head and tail may not overlap
    assert star_glob_matches("a**b", "ab")
    # Many stars against a long miss: the leftmost scan gives up at the first piece not
    # found, without trying splits (a backtracking translation would not finish).
    assert not star_glob_matches("*a" * 40 + "*b", "a" * 5000)


# --- unsafe signing key ---------------------------------------------------------------

# The key Go's ed25519.GenerateKey makes from math/rand seed 0 (ELEMENTSEC-2025-1670).
BAD_SEED = bytes.fromhex("0194fdc2fa2ffcc041d3ff12045b73c86e4ff95ff662a5eee82abdf44a2d0b75")
VERSION = "10"


def _signed(*signers: tuple[str, nacl.signing.SigningKey, str]) -> dict[str, Any]:
    ev = message("hello")
    ev["origin_server_ts"] = NOW
    ev["signatures"] = {}
    for server, key, key_id in signers:
        sign_event(get_room_version(VERSION), ev, server, key, key_id)
    return ev


async def _judge(
    deps: FilterDeps,
    ev: dict[str, Any],
    cfg: EffectiveConfig | None = None,
    *,
    checked: bool = False,
) -> Any:
    pipeline = Pipeline(deps, timeout_seconds=5)
    return await pipeline.evaluate(
        ev,
        event_id=new_event_id(),
        community_id="default",
        # No hellban: each case is judged on its own.
        config=cfg or config(hellban_postfilter_minutes=0),
        room_version=VERSION,
        sender_signatures_checked=checked,
    )


async def test_unsafe_signing_key_the_server_publishes_is_prohibited(
    deps: FilterDeps, redis_client: aioredis.Redis
) -> None:
    good = nacl.signing.SigningKey.generate()
    bad = nacl.signing.SigningKey(BAD_SEED)
    server = ALICE.partition(":")[2]
    # The keyring found the compromised key under ed25519:b in this server's own key
    # document (see tests/federation/test_keyring.py).
    await redis_client.set(redis_keys.unsafe_signing_key(server, "ed25519:b"), 1, ex=60)
    try:
        refused = await _judge(
            deps, _signed((server, good, "ed25519:a"), (server, bad, "ed25519:b"))
        )
        assert refused.content_class is P and refused.harms == (OTHER,)
        by_name = {f.name: f for f in refused.filters}
        assert by_name["unsafe_signing_key"].content_class is P

        fine = await _judge(deps, _signed((server, good, "ed25519:a")))
        assert fine.content_class is N

        # A bad-key signature under a key ID the server does not publish for that key:
        # anyone relaying the event could have added it, so it decides nothing.
        padded = await _judge(
            deps, _signed((server, good, "ed25519:a"), (server, bad, "ed25519:made_up"))
        )
        assert padded.content_class is N
        assert {f.name: f for f in padded.filters}["unsafe_signing_key"].content_class is N

        # What another server signed is not looked at (only the sender's server's).
        other = await _judge(
            deps, _signed((server, good, "ed25519:a"), ("other.example", bad, "ed25519:b"))
        )
        assert other.content_class is N

        # A bad-key signature over different bytes (not this event) is no match. (The
        # body is redacted away before signing, so change a kept field.)
        ev = _signed((server, good, "ed25519:a"))
        ev["signatures"][server]["ed25519:b"] = _signed((server, bad, "ed25519:b"))["signatures"][
            server
        ]["ed25519:b"]
        ev["origin_server_ts"] = NOW + 1
        assert (await _judge(deps, ev)).content_class is N

        # A good key's signature under the marked key ID is no match either.
        ev = _signed((server, good, "ed25519:b"))
        assert (await _judge(deps, ev)).content_class is N

        # A community can switch it off (policyserv cannot store false).
        off = config(unsafe_signing_key_filter_enabled=False, hellban_postfilter_minutes=0)
        both = _signed((server, good, "ed25519:a"), (server, bad, "ed25519:b"))
        assert (await _judge(deps, both, off)).content_class is N
    finally:
        await redis_client.delete(redis_keys.unsafe_signing_key(server, "ed25519:b"))


async def test_unsafe_signing_key_trusts_the_gateways_check_of_a_single_signature(
    deps: FilterDeps, redis_client: aioredis.Redis
) -> None:
    """One signature of the sender's server, verified by the gateway (``/sign``): it is
    valid under a key the keyring holds, which is never the compromised one, so the
    filter neither re-signs nor reads Redis. Unchecked (another path), it still does."""
    bad = nacl.signing.SigningKey(BAD_SEED)
    server = ALICE.partition(":")[2]
    only_bad = _signed((server, bad, "ed25519:b"))
    flt = UnsafeSigningKeyFilter()
    await redis_client.set(redis_keys.unsafe_signing_key(server, "ed25519:b"), 1, ex=60)
    try:
        # Unchecked: the single signature is the compromised key's, under the marked ID.
        unchecked = await _judge(deps, only_bad)
        assert {f.name: f for f in unchecked.filters}["unsafe_signing_key"].content_class is P
        # Checked by the gateway, such an event cannot arrive (the keyring dropped that
        # key, so its only signature would not have verified): nothing to look for.
        checked = await _judge(deps, only_bad, checked=True)
        assert {f.name: f for f in checked.filters}["unsafe_signing_key"].content_class is N
        # Two signatures, checked: the second may be the compromised key's; still found.
        two = _signed(
            (server, nacl.signing.SigningKey.generate(), "ed25519:a"), (server, bad, "ed25519:b")
        )
        assert (await _judge(deps, two, checked=True)).content_class is P
    finally:
        await redis_client.delete(redis_keys.unsafe_signing_key(server, "ed25519:b"))

    def ctx_for(ev: dict[str, Any], checked: bool) -> FilterContext:
        return FilterContext(
            event=ev,
            event_id="$x",
            room_id="!r:example.org",
            community_id="default",
            config=config(),
            deps=deps,
            room_version=VERSION,
            sender_signatures=ev["signatures"][server],
            sender_signatures_checked=checked,
        )

    # The pipeline gives it a timer (and may give it a task) only when it may read Redis.
    assert not flt.waits_for(ctx_for(only_bad, True))
    assert flt.waits_for(ctx_for(only_bad, False))
    assert flt.waits_for(ctx_for(two, True))

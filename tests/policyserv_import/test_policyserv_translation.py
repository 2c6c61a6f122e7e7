"""Go keyword templates translated to Jinja2, and policyserv's verdict encodings."""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from jinja2.sandbox import SandboxedEnvironment

from warden.policy.harms import OTHER
from warden.policy.verdict import ContentClass
from warden.policyserv_import.templates import Untranslatable, translate
from warden.policyserv_import.verdicts import (
    SKIP_V1_V2_NOT_REFUSED,
    Unimportable,
    decode_event,
    reference_hash_of,
)

SPAM = "org.matrix.msc4456.spam"
EVENT_ID = "$" + "A" * 42 + "g"


def render(jinja: str, body: str) -> list[str]:
    """Run a translated template as Warden's filter would (same globals), split."""
    env = SandboxedEnvironment()
    env.globals.update(
        BodyRaw=body,
        BodyWords=body.split(),
        StrSlice=lambda *items: list(items),
        ToLower=str.lower,
        ToUpper=str.upper,
        RemovePunctuation=lambda s: s.translate(str.maketrans("", "", string.punctuation)),
        StrSliceContains=lambda items, item: item in items,
        StringContains=lambda s, sub: sub in s,
    )
    return env.from_string(jinja).render().split()


@pytest.mark.parametrize(
    ("go", "jinja"),
    [
        (
            '{{ if StringContains (ToLower .BodyRaw) "crypto" }}' + SPAM + "{{ end }}",
            '{% if StringContains(ToLower(BodyRaw), "crypto") %}' + SPAM + "{% endif %}",
        ),
        (
            '{{if and (StrSliceContains .BodyWords "buy") (not (StringContains .BodyRaw "ok"))}}'
            "a{{else if eq (len .BodyWords) 1 2}}b{{else}}c{{end}}",
            '{% if (StrSliceContains(BodyWords, "buy") and (not StringContains(BodyRaw, "ok"))) %}'
            "a{% elif ((BodyWords|length) == 1 or (BodyWords|length) == 2) %}b{% else %}c"
            "{% endif %}",
        ),
        ("x {{- /* a comment */ -}} y", "xy"),
        ('{{ `raw "q"` }}', '{{ "raw \\"q\\"" }}'),
        ("50% {% off", '{{ "50% {% off" }}'),
    ],
)
def test_mechanical_translation(go: str, jinja: str) -> None:
    assert translate(go) == jinja


@pytest.mark.parametrize(
    ("body", "harms"),
    [
        ("FREE Crypto, friends!", [SPAM, "org.matrix.msc4456.spam.fraud"]),
        ("hello there", []),
        ("buy buy", ["org.matrix.msc4456.spam.flooding"]),
    ],
)
def test_translated_template_gives_the_go_templates_harms(body: str, harms: list[str]) -> None:
    go = (
        '{{- if StringContains (RemovePunctuation (ToLower .BodyRaw)) "free crypto" -}}\n'
        "  org.matrix.msc4456.spam org.matrix.msc4456.spam.fraud\n"
        '{{- else if StrSliceContains (StrSlice "buy" "sell") (index .BodyWords 0) }}x{{ end }}'
    )
    with pytest.raises(Untranslatable, match="index"):
        translate(go)
    go = (
        '{{- if StringContains (RemovePunctuation (ToLower .BodyRaw)) "free crypto" -}}\n'
        "  org.matrix.msc4456.spam org.matrix.msc4456.spam.fraud\n"
        '{{- else if and (StrSliceContains .BodyWords "buy") (gt (len .BodyWords) 1) -}}\n'
        "  org.matrix.msc4456.spam.flooding\n"
        "{{- end }}"
    )
    assert render(translate(go), body) == harms


@pytest.mark.parametrize(
    ("go", "why"),
    [
        ("{{ range .BodyWords }}x{{ end }}", "range"),
        ("{{ $w := .BodyWords }}", "variables"),
        ("{{ .BodyRaw | ToLower }}", "pipes"),
        ('{{ printf "%s" .BodyRaw }}', "printf"),
        ("{{ .Event }}", "field .Event"),
        ("{{ if .BodyRaw }}x", "if without end"),
        ("{{ end }}", "unmatched end"),
        ('{{ "\\x41" }}', "escape"),
        ("{{ .BodyRaw ", "unclosed"),
        ("{{ with .BodyRaw }}{{ end }}", "with"),
    ],
)
def test_untranslatable_templates_say_why(go: str, why: str) -> None:
    with pytest.raises(Untranslatable, match=why):
        translate(go)


@pytest.mark.parametrize(
    ("spam", "vectors", "cls", "harms", "encoding"),
    [
        (True, '{"h:org.matrix.msc4456.spam": 1.0}', ContentClass.PROHIBITED, (SPAM,), "harms"),
        (False, '{"h:org.matrix.msc4456.spam": 1.0}', ContentClass.PROHIBITED, (SPAM,), "harms"),
        (True, '{"h:org.matrix.msc4456.spam": 0}', ContentClass.PROHIBITED, (OTHER,), "harms"),
        (False, '{"Allowed": 1.0}', ContentClass.ALLOWED, (), "harms"),
        (False, "", ContentClass.NEUTRAL, (), "empty"),
        (True, "{}", ContentClass.PROHIBITED, (OTHER,), "empty"),
        (
            False,
            '{"org.matrix.policyserv.vec.spam": 0.5}',
            ContentClass.NEUTRAL,
            (),
            "legacy_vectors",
        ),
        (
            True,
            '{"org.matrix.policyserv.vec.spam": 1.0}',
            ContentClass.PROHIBITED,
            (OTHER,),
            "legacy_vectors",
        ),
        (True, '{"badword": 1.0}', ContentClass.PROHIBITED, (OTHER,), "legacy_reasons"),
        (False, '{"fine": 1.0}', ContentClass.NEUTRAL, (), "legacy_reasons"),
    ],
)
def test_every_verdict_encoding(
    spam: bool, vectors: str, cls: ContentClass, harms: tuple[str, ...], encoding: str
) -> None:
    v = decode_event(EVENT_ID, spam, vectors)
    assert (v.content_class, v.harms, v.encoding) == (cls, harms, encoding)


@pytest.mark.parametrize(
    ("event_id", "why"),
    [
        ("$abc:example.org", "room v1/v2"),
        ("$short", "not an event ID"),
        ("$" + "A" * 41 + "+_", "not an event ID"),  # both alphabets at once
    ],
)
def test_event_ids_that_bind_no_content(event_id: str, why: str) -> None:
    with pytest.raises(Unimportable, match=why):
        reference_hash_of(event_id)


@pytest.mark.parametrize("vectors", ["{nope", "[1]", '{"h:bad harm": 1}'])
def test_unreadable_vectors(vectors: Any) -> None:
    with pytest.raises(Unimportable):
        decode_event(EVENT_ID, True, vectors)


def test_url_safe_and_standard_ids_give_the_hash_the_gateway_computes() -> None:
    assert reference_hash_of("$" + "-" * 42 + "w") == "+" * 42 + "w"
    assert reference_hash_of("$" + "/" * 42 + "w") == "/" * 42 + "w"


@pytest.mark.parametrize(
    ("spam", "vectors", "harms"),
    [
        (True, '{"h:org.matrix.msc4456.spam": 1.0}', (SPAM,)),
        (True, "{}", (OTHER,)),
        (False, '{"h:org.matrix.msc4456.spam": 1.0}', (SPAM,)),
    ],
)
def test_room_v1_v2_refusals_come_unbound(spam: bool, vectors: str, harms: tuple[str, ...]) -> None:
    v = decode_event("$abc:example.org", spam, vectors)
    assert (v.content_class, v.harms, v.reference_hash) == (ContentClass.PROHIBITED, harms, None)


@pytest.mark.parametrize(
    ("event_id", "spam", "vectors", "why"),
    [
        ("$abc:example.org", False, '{"Allowed": 1.0}', SKIP_V1_V2_NOT_REFUSED),
        ("$abc:example.org", False, "{}", SKIP_V1_V2_NOT_REFUSED),
        ("$a b:example.org", True, "{}", "room v1/v2"),  # not an ID Warden would accept
        ("$" + "a" * 250 + ":example.org", True, "{}", "room v1/v2"),  # over 255 bytes
    ],
)
def test_room_v1_v2_verdicts_not_imported(
    event_id: str, spam: bool, vectors: str, why: str
) -> None:
    with pytest.raises(Unimportable, match=re.escape(why)):
        decode_event(event_id, spam, vectors)

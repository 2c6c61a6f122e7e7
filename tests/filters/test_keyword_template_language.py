"""The keyword-template language: helpers, compile errors, the sandbox and its bounds."""

from __future__ import annotations

import pytest

from warden.policy import keyword_template_language as lang
from warden.policy.keyword_template_language import (
    CompiledTemplate,
    TemplateCompileError,
    TemplateLimitExceeded,
    TemplateRenderError,
    body_inputs,
)


def render(source: str, text: str = "hello world") -> str:
    return CompiledTemplate("t", source).render_text(*body_inputs(text))


def test_the_reference_example_and_inputs() -> None:
    src = (
        '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
        "org.matrix.msc4456.spam.fraud{% endif %}"
    )
    assert render(src, "Get FREE Crypto now") == "org.matrix.msc4456.spam.fraud"
    assert render(src, "free bitcoin") == ""
    # BodyWords is BodyRaw split on any whitespace.
    assert render("{{ BodyWords|length }}:{{ BodyWords|join(',') }}", " a\tb\n c ") == "3:a,b,c"
    assert render("{{ BodyRaw }}", "x  y") == "x  y"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('{{ StrSlice("a", "b")|join("+") }}', "a+b"),
        ('{{ ToLower("AbC") }}{{ ToUpper("aBc") }}', "abcABC"),
        ('{{ RemovePunctuation("he!!o, wor.ld?¿") }}', "heo world"),
        ('{{ StrSliceContains(StrSlice("spam", "eggs"), "eggs") }}', "True"),
        ('{{ StrSliceContains(StrSlice("spam", "eggs"), "egg") }}', "False"),
        ('{{ StrSliceContains(BodyWords, "world") }}', "True"),
        ('{{ StringContains("hello world", "o w") }}', "True"),
        ('{{ StringContains("hello world", "O W") }}', "False"),
        ("{% for w in BodyWords %}{{ loop.index }}{{ w|upper }}{% endfor %}", "1HELLO2WORLD"),
        ('{{ BodyRaw.split()|first }} {{ "x".startswith("x") }}', "hello True"),
    ],
)
def test_helpers(source: str, expected: str) -> None:
    assert render(source) == expected


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("{% if %}", 1),
        ("ok\nok\n{% for x in %}{% endfor %}", 3),
        ("{{ 1 + }}", 1),
        ("line\n{% if BodyRaw %}never closed", 2),
        ("{{ BodyRaw|nosuchfilter }}", 1),
    ],
)
def test_syntax_errors_name_the_line(source: str, line: int) -> None:
    with pytest.raises(TemplateCompileError) as info:
        CompiledTemplate("t", source)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ().__class__.__bases__ }}",
        "{{ ''['__class__'] }}",
        "{{ ToLower.__globals__ }}",
        "{{ range.__self__ }}",
        "{{ BodyWords._x }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{% call BodyRaw %}{% endcall %}",
        "{% for x in BodyWords recursive %}{{ loop(BodyWords) }}{% endfor %}",
        "{% set x %}{{ BodyRaw }}{% endset %}",
        "{% filter upper %}{{ BodyRaw }}{% endfilter %}",
        "{% include 'other' %}",
        "{% import 'other' as o %}",
        "{% extends 'other' %}",
        "{{ BodyRaw|attr('upper') }}",
        "{{ BodyRaw|format(1) }}",
    ],
)
def test_escape_attempts_are_refused_at_compile_time(source: str) -> None:
    with pytest.raises(TemplateCompileError):
        CompiledTemplate("t", source)


@pytest.mark.parametrize(
    "source",
    [
        # Names built at run time reach the sandbox's own checks.
        "{% set k = '__cla' ~ 'ss__' %}{{ ''[k].mro() }}",
        "{% set k = '__glo' ~ 'bals__' %}{{ ToLower[k]['os'] }}",
        # Only the helpers and plain string/list methods are callable.
        "{{ BodyRaw.center(10**9) }}",
        "{{ BodyRaw.replace('o', 'oooo') }}",
        "{{ '{0.__class__}'.format(BodyRaw) }}",
        "{{ '%s' % BodyRaw }}",
        "{{ lipsum(100000) }}",
        "{{ namespace(a=1) }}",
        "{{ cycler(1, 2).next() }}",
        "{{ dict(a=1) }}",
        "{{ BodyWords.append(1) }}",
    ],
)
def test_escape_attempts_are_refused_at_render_time(source: str) -> None:
    template = CompiledTemplate("t", source)
    with pytest.raises(TemplateRenderError):
        template.render_text(*body_inputs("hello"))


def test_sandbox_hides_internal_attributes_even_when_not_called() -> None:
    key = "'__cla' ~ 'ss__'"
    # An unsafe attribute is undefined: printing it shows nothing of the class.
    assert render(f"{{% set k = {key} %}}{{{{ BodyRaw[k] }}}}") == ""


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(10**9) %}{% endfor %}",
        "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}",
        "{% for w in BodyWords %}{% for v in BodyWords %}{% endfor %}{% endfor %}",
        "{{ 'x' * 10**9 }}",
        "{{ BodyWords * 10**9 }}",
        "{{ 2 ** (10 ** 7) }}",
        "{% set a = 10 ** 100 %}" + "{% set a = a * a %}" * 10,
        "{% set a = BodyRaw ~ BodyRaw %}" + "{% set a = a ~ a %}" * 40,
        "{% set a = BodyRaw + BodyRaw %}" + "{% set a = a + a %}" * 40,
        "{{ BodyWords|join(BodyRaw) }}",
        "{% for i in range(10000) %}org.matrix.msc4456.spam {% endfor %}",
    ],
)
def test_huge_work_and_output_are_bounded(source: str) -> None:
    template = CompiledTemplate("t", source)
    with pytest.raises(TemplateLimitExceeded):
        template.render_text(*body_inputs("word " * 2000))


def test_render_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no time left, the first loop iteration stops the render.
    monkeypatch.setattr(lang, "RENDER_DEADLINE_SECONDS", -1.0)
    template = CompiledTemplate("t", "{% for w in BodyWords %}{% endfor %}")
    with pytest.raises(TemplateLimitExceeded, match="longer than"):
        template.render_text(*body_inputs("a b"))


def test_errors_in_templates_are_render_errors() -> None:
    for source in ("{{ 1 / 0 }}", "{{ nothing.at.all }}", "{{ BodyWords[0] + 1 }}"):
        with pytest.raises(TemplateRenderError):
            render(source)


def test_templates_too_large_are_refused() -> None:
    with pytest.raises(TemplateCompileError, match="larger than"):
        CompiledTemplate("t", "x" * (lang.MAX_TEMPLATE_BYTES + 1))


@pytest.mark.parametrize(
    "source",
    [
        "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
        "{% for x in BodyWords %}" * 25 + "{% endfor %}" * 25,
    ],
)
def test_deep_nesting_is_a_compile_error(source: str) -> None:
    with pytest.raises(TemplateCompileError, match="nested too deeply"):
        CompiledTemplate("t", source)

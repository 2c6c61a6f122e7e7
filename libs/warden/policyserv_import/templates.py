"""Policyserv keyword templates (Go ``text/template``) translated to Warden's Jinja2.

Only the mechanical subset is translated: text, ``{{if}}``/``{{else if}}``/``{{else}}``/
``{{end}}``, output actions, comments, trim markers, and expressions built from string,
number and boolean literals, ``.BodyRaw``/``.BodyWords``, parentheses, the template
functions (``StrSlice``, ``ToLower``, ``ToUpper``, ``RemovePunctuation``,
``StrSliceContains``, ``StringContains``) and the builtins ``and``, ``or``, ``not``,
``eq``, ``ne``, ``lt``, ``le``, ``gt``, ``ge`` and ``len``. Go's prefix calls become
function calls: ``StringContains (ToLower .BodyRaw) "x"`` →
``StringContains(ToLower(BodyRaw), "x")``.

Anything else (variables, pipes, ``range``, ``with``, ``define``, ``printf``, other
fields) raises ``Untranslatable`` with the reason; the importer keeps such a template
disabled with its original text. The output of a template is whitespace-separated harm
IDs, so whitespace differences between the two engines do not matter; trim markers are
still applied here, as Go does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FUNCTIONS = frozenset(
    {"StrSlice", "ToLower", "ToUpper", "RemovePunctuation", "StrSliceContains", "StringContains"}
)
FIELDS = {".BodyRaw": "BodyRaw", ".BodyWords": "BodyWords"}
_COMPARISONS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_UNSUPPORTED_KEYWORDS = frozenset(
    {"range", "with", "define", "template", "block", "break", "continue", "nil"}
)
MAX_TEMPLATE_BYTES = 65_536
MAX_NESTING = 64

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\\n]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<field>\.[A-Za-z_][A-Za-z0-9_]*)
    | (?P<var>\$[A-Za-z0-9_]*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>:=|[()|=,])
    )""",
    re.VERBOSE,
)
_GO_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"'}


class Untranslatable(ValueError):
    """The template uses something without a mechanical Jinja2 equivalent."""


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def _jinja_string(value: str) -> str:
    """A Jinja2 string literal for ``value``."""
    out = value.replace("\\", "\\\\").replace('"', '\\"')
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return '"' + out + '"'


def _go_string(literal: str) -> str:
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            esc = body[i + 1]
            if esc not in _GO_ESCAPES:
                raise Untranslatable(f"string escape \\{esc} is not supported")
            out.append(_GO_ESCAPES[esc])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _tokens(action: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(action):
        if not action[pos:].strip():
            break
        m = _TOKEN.match(action, pos)
        if m is None or m.end() == pos:
            raise Untranslatable(f"cannot read {action[pos:].strip()[:40]!r}")
        kind = m.lastgroup
        assert kind is not None
        toks.append(_Tok(kind, m.group(kind)))
        pos = m.end()
    return toks


class _Expr:
    """A recursive-descent reader of one Go pipeline, emitting a Jinja2 expression."""

    def __init__(self, toks: list[_Tok]) -> None:
        self._toks = toks
        self._pos = 0
        self._depth = 0

    def parse(self) -> str:
        if not self._toks:
            raise Untranslatable("empty action")
        out = self._command()
        if self._pos != len(self._toks):
            tok = self._toks[self._pos]
            if tok.text == "|":
                raise Untranslatable("pipes (|) are not supported")
            raise Untranslatable(f"unexpected {tok.text!r}")
        return out

    def _peek(self) -> _Tok | None:
        return self._toks[self._pos] if self._pos < len(self._toks) else None

    def _command(self) -> str:
        """A command: an operand, or a function or builtin applied to operands."""
        first = self._peek()
        if first is None:
            raise Untranslatable("missing expression")
        if first.kind == "ident" and first.text not in ("true", "false"):
            self._pos += 1
            args = self._args()
            return self._call(first.text, args)
        value = self._operand()
        if self._args_follow():
            raise Untranslatable(f"{first.text!r} is not a function")
        return value

    def _args_follow(self) -> bool:
        tok = self._peek()
        return tok is not None and tok.text not in (")", "|")

    def _args(self) -> list[str]:
        args: list[str] = []
        while self._args_follow():
            args.append(self._operand())
        return args

    def _operand(self) -> str:
        tok = self._peek()
        if tok is None:
            raise Untranslatable("missing operand")
        self._pos += 1
        if tok.kind == "str":
            return _jinja_string(_go_string(tok.text))
        if tok.kind == "raw":
            return _jinja_string(tok.text[1:-1])
        if tok.kind == "num":
            return tok.text
        if tok.kind == "field":
            if tok.text not in FIELDS:
                raise Untranslatable(f"field {tok.text} is not a template input")
            return FIELDS[tok.text]
        if tok.kind == "var":
            raise Untranslatable("variables ($) are not supported")
        if tok.kind == "ident":
            if tok.text in ("true", "false"):
                return tok.text
            return self._call(tok.text, [])  # a function without arguments
        if tok.text == "(":
            self._depth += 1
            if self._depth > MAX_NESTING:
                raise Untranslatable("expression nested too deeply")
            inner = self._command()
            close = self._peek()
            if close is None or close.text != ")":
                if close is not None and close.text == "|":
                    raise Untranslatable("pipes (|) are not supported")
                raise Untranslatable("unbalanced parentheses")
            self._pos += 1
            self._depth -= 1
            return inner
        raise Untranslatable(f"unexpected {tok.text!r}")

    @staticmethod
    def _call(name: str, args: list[str]) -> str:
        if name in FUNCTIONS:
            return f"{name}({', '.join(args)})"
        if name in ("and", "or"):
            if not args:
                raise Untranslatable(f"{name} needs arguments")
            return "(" + f" {name} ".join(args) + ")"
        if name == "not":
            if len(args) != 1:
                raise Untranslatable("not takes one argument")
            return f"(not {args[0]})"
        if name == "len":
            if len(args) != 1:
                raise Untranslatable("len takes one argument")
            return f"({args[0]}|length)"
        if name in _COMPARISONS:
            if len(args) < 2 or (name != "eq" and len(args) != 2):
                raise Untranslatable(f"{name} takes two arguments")
            op = _COMPARISONS[name]
            parts = [f"{args[0]} {op} {other}" for other in args[1:]]
            return "(" + " or ".join(parts) + ")"
        if name in _UNSUPPORTED_KEYWORDS:
            raise Untranslatable(f"{name} is not supported")
        raise Untranslatable(f"function {name} is not available in Warden's templates")


def _split(template: str) -> list[tuple[str, str, bool, bool]]:
    """``(kind, text, trim_left, trim_right)`` pieces: kind ``text`` or ``action``."""
    pieces: list[tuple[str, str, bool, bool]] = []
    pos = 0
    while True:
        start = template.find("{{", pos)
        if start < 0:
            pieces.append(("text", template[pos:], False, False))
            return pieces
        pieces.append(("text", template[pos:start], False, False))
        inner_start = start + 2
        trim_left = template.startswith("- ", inner_start) or template.startswith(
            "-\t", inner_start
        )
        if trim_left:
            inner_start += 1
        if template[inner_start:].lstrip(" \t").startswith("/*"):
            end_comment = template.find("*/", inner_start)
            if end_comment < 0:
                raise Untranslatable("unclosed comment")
            end = template.find("}}", end_comment)
        else:
            end = _action_end(template, inner_start)
        if end < 0:
            raise Untranslatable("unclosed action")
        inner = template[inner_start:end]
        trim_right = inner.endswith(" -") or inner.endswith("\t-")
        if trim_right:
            inner = inner[:-1]
        pieces.append(("action", inner, trim_left, trim_right))
        pos = end + 2


def _action_end(template: str, pos: int) -> int:
    """Where the action starting at ``pos`` ends (``}}`` outside string literals)."""
    i = pos
    while i < len(template):
        ch = template[i]
        if ch == '"':
            i += 1
            while i < len(template) and template[i] != '"':
                i += 2 if template[i] == "\\" else 1
        elif ch == "`":
            i = template.find("`", i + 1)
            if i < 0:
                return -1
        elif template.startswith("}}", i):
            return i
        i += 1
    return -1


def translate(template: str) -> str:
    """The Jinja2 equivalent of a policyserv keyword template.

    Raises ``Untranslatable`` (the message says what) when no mechanical translation
    exists.
    """
    if len(template.encode("utf-8")) > MAX_TEMPLATE_BYTES:
        raise Untranslatable(f"longer than {MAX_TEMPLATE_BYTES} bytes")
    pieces = _split(template)
    # Go's trim markers eat the whitespace next to the action.
    texts = [[kind, text] for kind, text, _, _ in pieces]
    for i, (kind, _, trim_left, trim_right) in enumerate(pieces):
        if kind != "action":
            continue
        if trim_left and i > 0:
            texts[i - 1][1] = texts[i - 1][1].rstrip()
        if trim_right and i + 1 < len(texts):
            texts[i + 1][1] = texts[i + 1][1].lstrip()
    out: list[str] = []
    stack: list[str] = []
    for kind, text in texts:
        if kind == "text":
            if text:
                if "{%" in text or "{#" in text or "{{" in text:
                    out.append("{{ " + _jinja_string(text) + " }}")
                else:
                    out.append(text)
            continue
        body = text.strip()
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise Untranslatable("a comment must be the whole action")
            continue
        toks = _tokens(body)
        if not toks:
            raise Untranslatable("empty action")
        head = toks[0]
        if head.kind == "ident" and head.text == "if":
            stack.append("if")
            if len(stack) > MAX_NESTING:
                raise Untranslatable("blocks nested too deeply")
            out.append("{% if " + _Expr(toks[1:]).parse() + " %}")
        elif head.kind == "ident" and head.text == "else":
            if not stack:
                raise Untranslatable("else outside if")
            if len(toks) > 1 and toks[1].text == "if":
                out.append("{% elif " + _Expr(toks[2:]).parse() + " %}")
            elif len(toks) == 1:
                out.append("{% else %}")
            else:
                raise Untranslatable(f"else {toks[1].text} is not supported")
        elif head.kind == "ident" and head.text == "end":
            if len(toks) != 1 or not stack:
                raise Untranslatable("unmatched end")
            stack.pop()
            out.append("{% endif %}")
        elif head.kind == "ident" and head.text in _UNSUPPORTED_KEYWORDS:
            raise Untranslatable(f"{head.text} is not supported")
        elif any(t.kind == "punct" and t.text in (":=", "=") for t in toks):
            raise Untranslatable("variables ($) are not supported")
        else:
            out.append("{{ " + _Expr(toks).parse() + " }}")
    if stack:
        raise Untranslatable("if without end")
    return "".join(out)

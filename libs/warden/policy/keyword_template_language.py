"""The keyword-template language: sandboxed Jinja2 with policyserv's inputs and helpers.

A template sees two inputs, as policyserv's Go templates do: ``BodyRaw`` (the message's
``body`` + " " + ``formatted_body``, or the whole event as JSON) and ``BodyWords``
(``BodyRaw`` split on whitespace), and policyserv's six helpers as global functions:
``StrSlice``, ``ToLower``, ``ToUpper``, ``RemovePunctuation``, ``StrSliceContains`` and
``StringContains``. Its output is whitespace-separated harm IDs, e.g.::

    {% if StringContains(ToLower(BodyRaw), "free crypto") %}org.matrix.msc4456.spam.fraud{% endif %}

Templates are written by operators but run on every message, so a template must not be
able to leave the sandbox nor to stall a worker. Jinja2's ``ImmutableSandboxedEnvironment``
refuses internal attributes (``__class__`` …) and mutation; on top of it:

* at compile time, attribute or item names starting with ``_`` are refused, and so are
  the constructs that could recurse or buffer without bound (macros, ``call`` blocks,
  recursive loops, block assignments, filter blocks) or reach other templates
  (``include``, ``import``, ``extends``);
* the globals are only the inputs, the helpers and a small ``range``; the filters an
  allow-list of ones that cannot amplify their input; method calls an allow-list of
  plain string and list methods;
* every ``for`` loop iteration, call and operator draws from one budget per render;
  ``~`` and the arithmetic operators refuse results past ``MAX_VALUE_LENGTH`` items (or
  huge integers); a deadline is checked at every iteration, call and operator;
* the output stops at ``MAX_OUTPUT_CHARS``.

Anything over a bound raises ``TemplateLimitExceeded`` (a ``TemplateRenderError``).
"""

from __future__ import annotations

import contextvars
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Bounds on one render (see the module docstring).
MAX_TEMPLATE_BYTES = 64 * 1024
MAX_ITERATIONS = 100_000
MAX_RANGE = 10_000
MAX_VALUE_LENGTH = 256 * 1024  # characters of a string, items of a list
MAX_INT_BITS = 4096
MAX_OUTPUT_CHARS = 4096
RENDER_DEADLINE_SECONDS = 0.25


class TemplateCompileError(ValueError):
    """The template cannot be compiled; ``line`` is where (None when unknown)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.message = message
        self.line = line


class TemplateRenderError(RuntimeError):
    """Rendering failed (an error in the template, or a refused operation)."""


class TemplateLimitExceeded(TemplateRenderError):
    """Rendering went past one of the bounds (time, iterations, sizes, output)."""


# --- Per-render budget ---------------------------------------------------------------


@dataclass
class _Budget:
    deadline: float
    iterations: int = MAX_ITERATIONS

    def tick(self) -> None:
        self.iterations -= 1
        if self.iterations < 0:
            raise TemplateLimitExceeded(f"more than {MAX_ITERATIONS} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded(
                f"rendering took longer than {RENDER_DEADLINE_SECONDS} seconds"
            )


# Rendering is synchronous, so the budget of the render in progress is simply the
# current context's; a render that forgets to set one gets an exhausted budget.
_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("keyword_template_budget")


def _budget() -> _Budget:
    try:
        return _BUDGET.get()
    except LookupError:
        raise TemplateLimitExceeded("no render budget") from None


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > MAX_VALUE_LENGTH:
        raise TemplateLimitExceeded(f"a value longer than {MAX_VALUE_LENGTH} items")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitExceeded(f"an integer larger than {MAX_INT_BITS} bits")
    return value


# --- Helpers (policyserv's names) ----------------------------------------------------


def _str_slice(*items: Any) -> list[str]:
    """``StrSlice("a", "b")`` → a list of strings (Go templates cannot write literals)."""
    _budget().tick()
    return _check_size([str(i) for i in items])  # type: ignore[no-any-return]


def _to_lower(value: Any) -> str:
    _budget().tick()
    return str(value).lower()


def _to_upper(value: Any) -> str:
    _budget().tick()
    return str(value).upper()


def _remove_punctuation(value: Any) -> str:
    """Drop every Unicode punctuation character (categories P*)."""
    _budget().tick()
    return "".join(c for c in str(value) if not unicodedata.category(c).startswith("P"))


def _str_slice_contains(items: Any, value: Any) -> bool:
    """Whether the list holds exactly ``value``."""
    _budget().tick()
    if isinstance(items, str) or not isinstance(items, list | tuple):
        return False
    return value in items


def _string_contains(value: Any, substring: Any) -> bool:
    """Whether ``substring`` occurs in ``value``."""
    _budget().tick()
    return str(substring) in str(value)


def _range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimitExceeded(f"range() of more than {MAX_RANGE} items")
    return rng


def _bounded_iter(iterable: Any) -> Iterator[Any]:
    """What every ``for`` loop iterates (inserted at compile time): draws on the budget."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _bounded_concat(*parts: Any) -> str:
    """``a ~ b`` with the result's size checked before it is built."""
    budget = _budget()
    budget.tick()
    texts = [str(p) for p in parts]
    if sum(len(t) for t in texts) > MAX_VALUE_LENGTH:
        raise TemplateLimitExceeded(f"a value longer than {MAX_VALUE_LENGTH} items")
    return "".join(texts)


HELPERS: dict[str, Callable[..., Any]] = {
    "StrSlice": _str_slice,
    "ToLower": _to_lower,
    "ToUpper": _to_upper,
    "RemovePunctuation": _remove_punctuation,
    "StrSliceContains": _str_slice_contains,
    "StringContains": _string_contains,
}

_ITER = "__warden_iter"
_CONCAT = "__warden_concat"
_INTERNAL_GLOBALS: dict[str, Callable[..., Any]] = {
    _ITER: _bounded_iter,
    _CONCAT: _bounded_concat,
    "range": _range,
}
_CALLABLE = frozenset(id(f) for f in (*HELPERS.values(), *_INTERNAL_GLOBALS.values()))

# Methods a template may call: none amplifies its input, none mutates.
_STR_METHODS = frozenset(
    {
        "capitalize",
        "casefold",
        "count",
        "endswith",
        "find",
        "isalnum",
        "isalpha",
        "isdigit",
        "islower",
        "isspace",
        "isupper",
        "lower",
        "lstrip",
        "removeprefix",
        "removesuffix",
        "rfind",
        "rsplit",
        "rstrip",
        "split",
        "startswith",
        "strip",
        "title",
        "upper",
    }
)
_LIST_METHODS = frozenset({"count", "index"})
_LOOP_METHODS = frozenset({"cycle", "changed"})


def _bounded_join(value: Iterable[Any], d: str = "") -> str:
    items = [str(v) for v in value]
    if sum(len(i) for i in items) + len(str(d)) * len(items) > MAX_VALUE_LENGTH:
        raise TemplateLimitExceeded(f"a value longer than {MAX_VALUE_LENGTH} items")
    return str(d).join(items)


_SAFE_FILTERS = (
    "abs",
    "capitalize",
    "count",
    "d",
    "default",
    "first",
    "float",
    "int",
    "last",
    "length",
    "list",
    "lower",
    "map",
    "max",
    "min",
    "reject",
    "reverse",
    "round",
    "select",
    "sort",
    "string",
    "title",
    "trim",
    "unique",
    "upper",
    "wordcount",
)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox with Warden's extra bounds."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(autoescape=False, auto_reload=False, cache_size=0)
        # Replaces lipsum, dict, cycler and namespace (which would let a loop carry a
        # growing value out of its scope).
        self.globals = {**_INTERNAL_GLOBALS, **HELPERS}
        self.filters = {name: self.filters[name] for name in _SAFE_FILTERS}
        self.filters["join"] = _bounded_join

    def is_safe_callable(self, obj: Any) -> bool:
        """Only the helpers and allow-listed methods of plain values."""
        if id(obj) in _CALLABLE:
            return True
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "")
        if isinstance(owner, str):
            return name in _STR_METHODS
        if isinstance(owner, list | tuple):
            return name in _LIST_METHODS
        if isinstance(owner, LoopContext):
            return name in _LOOP_METHODS
        return False

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Call an allowed function, with the deadline checked and the result bounded."""
        _budget().tick()
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Arithmetic with sizes checked before big values are built."""
        _budget().tick()
        if operator == "%" and isinstance(left, str):
            raise SecurityError("string formatting with % is not allowed")
        if operator == "*" and any(
            isinstance(seq, str | list | tuple)
            and isinstance(n, int)
            and len(seq) * max(n, 0) > MAX_VALUE_LENGTH
            for seq, n in ((left, right), (right, left))
        ):
            raise TemplateLimitExceeded(f"a value longer than {MAX_VALUE_LENGTH} items")
        if (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and max(left.bit_length(), 1) * right > MAX_INT_BITS
        ):
            raise TemplateLimitExceeded(f"an integer larger than {MAX_INT_BITS} bits")
        if (
            operator == "+"
            and isinstance(left, str | list | tuple)
            and isinstance(right, str | list | tuple)
            and len(left) + len(right) > MAX_VALUE_LENGTH
        ):
            raise TemplateLimitExceeded(f"a value longer than {MAX_VALUE_LENGTH} items")
        return _check_size(super().call_binop(context, operator, left, right))


_ENV = _Environment()

# Constructs refused at compile time, with why.
_REFUSED: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Macro, "macros are not allowed"),
    (nodes.CallBlock, "call blocks are not allowed"),
    (nodes.AssignBlock, "block assignments ({% set x %}…{% endset %}) are not allowed"),
    (nodes.FilterBlock, "filter blocks are not allowed"),
    (nodes.Include, "include is not allowed"),
    (nodes.Import, "import is not allowed"),
    (nodes.FromImport, "import is not allowed"),
    (nodes.Extends, "extends is not allowed"),
    (nodes.Block, "blocks are not allowed"),
)


def _refuse(node: nodes.Node, message: str) -> TemplateCompileError:
    return TemplateCompileError(message, getattr(node, "lineno", None))


def _check_and_rewrite(tree: nodes.Template) -> None:
    """Refuse unsafe constructs; route loops and ``~`` through the bounded helpers."""
    for kind, message in _REFUSED:
        found = tree.find(kind)
        if found is not None:
            raise _refuse(found, message)
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        if isinstance(node, nodes.Getattr):
            name: Any = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:
            name = getattr(node, "name", None)
        if isinstance(name, str) and name.startswith("_"):
            raise _refuse(node, f"names starting with '_' are not allowed ({name!r})")
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            raise _refuse(loop, "recursive loops are not allowed")
        loop.iter = nodes.Call(
            nodes.Name(_ITER, "load", lineno=loop.lineno), [loop.iter], [], None, None
        )
        loop.iter.lineno = loop.lineno
    # Replace each ``~`` in place (its parent's field), children before parents.
    for parent in list(tree.find_all(nodes.Node)):
        for field in parent.fields:
            value = getattr(parent, field, None)
            if isinstance(value, nodes.Concat):
                setattr(parent, field, _concat_call(value))
            elif isinstance(value, list):
                setattr(
                    parent,
                    field,
                    [_concat_call(v) if isinstance(v, nodes.Concat) else v for v in value],
                )


def _concat_call(node: nodes.Concat) -> nodes.Call:
    call = nodes.Call(
        nodes.Name(_CONCAT, "load", lineno=node.lineno), list(node.nodes), [], None, None
    )
    call.lineno = node.lineno
    return call


class CompiledTemplate:
    """A compiled keyword template; ``render`` gives the harm IDs it outputs."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        if len(source.encode("utf-8")) > MAX_TEMPLATE_BYTES:
            raise TemplateCompileError(f"template is larger than {MAX_TEMPLATE_BYTES} bytes", None)
        try:
            tree = _ENV.parse(source)
            _check_and_rewrite(tree)
            code = _ENV.compile(tree, name=name)
        except TemplateSyntaxError as exc:
            raise TemplateCompileError(exc.message or "syntax error", exc.lineno) from None
        except (RecursionError, SyntaxError, MemoryError):
            # Jinja2's parser and Python's compiler recurse per nesting level, and Python
            # allows only 20 nested loops.
            raise TemplateCompileError("the template is nested too deeply", None) from None
        self._template = _ENV.template_class.from_code(_ENV, code, _ENV.make_globals(None))

    def render_text(self, body_raw: str, body_words: Sequence[str]) -> str:
        """The template's output for these inputs; raises ``TemplateRenderError``."""
        token = _BUDGET.set(_Budget(deadline=time.monotonic() + RENDER_DEADLINE_SECONDS))
        out: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(BodyRaw=body_raw, BodyWords=list(body_words)):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateLimitExceeded(f"output longer than {MAX_OUTPUT_CHARS} characters")
                out.append(chunk)
        except TemplateRenderError:
            raise
        except (TemplateError, ArithmeticError, ValueError, TypeError, LookupError) as exc:
            raise TemplateRenderError(f"{type(exc).__name__}: {exc}") from None
        except RecursionError:
            raise TemplateLimitExceeded("recursion too deep") from None
        finally:
            _BUDGET.reset(token)
        return "".join(out)


def body_inputs(body_raw: str) -> tuple[str, list[str]]:
    """``BodyRaw`` and ``BodyWords`` (``BodyRaw`` split on whitespace) for a text."""
    return body_raw, body_raw.split()

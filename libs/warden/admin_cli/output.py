"""Readable output of the admin CLI: aligned tables and ``key: value`` blocks."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import orjson


def cell(value: Any) -> str:
    """A value as table text: lists comma-joined, nested objects as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value) if value else "-"
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    text = str(value)
    return text if text else '""'


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned on the widest cell; ``(none)`` when there are no rows."""
    if not rows:
        return "(none)"
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in texts)) for i, h in enumerate(headers)]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in texts)
    return "\n".join(out)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """``label: value`` lines, values aligned."""
    width = max(len(label) for label, _ in pairs)
    return "\n".join(f"{(label + ':').ljust(width + 1)} {cell(value)}" for label, value in pairs)


def timestamp(ms: Any) -> str:
    """Milliseconds since the epoch as UTC time; 0 or missing is ``never``."""
    if not isinstance(ms, int) or isinstance(ms, bool) or ms <= 0:
        return "never"
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def as_json(value: Any) -> str:
    """The answer as indented JSON, keys in the server's order."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()

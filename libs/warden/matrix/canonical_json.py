"""Canonical JSON (spec: Appendices, "Canonical JSON") and strict parsing of Matrix JSON.

Encoding uses orjson with sorted keys: for every value the spec allows (strings,
integers in the safe range, booleans, null, lists and objects with string keys) its
bytes are identical to ``canonicaljson.encode_canonical_json``; the property tests in
``tests/matrix/test_canonical_json.py`` hold the two against each other.

Parsing rejects what the spec forbids in events: floats, NaN/Infinity, integers
outside [-(2**53)+1, 2**53-1], and duplicate object keys.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_SAFE_INT = 2**53 - 1
MIN_SAFE_INT = -(2**53) + 1

JsonDict = dict[str, Any]


class CanonicalJSONError(ValueError):
    """The value cannot be represented as Matrix canonical JSON."""


def encode_canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes.

    Raises ``CanonicalJSONError`` for floats, out-of-range integers and non-string keys.
    """
    check_canonical(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # non-str keys, unsupported types, lone surrogates
        raise CanonicalJSONError(str(exc)) from exc


def encode_json(value: Any) -> bytes:
    """Compact JSON for responses, without the canonical checks (keys unsorted)."""
    return orjson.dumps(value)


def check_canonical(value: Any, _depth: int = 0) -> None:
    """Raise ``CanonicalJSONError`` unless ``value`` holds only canonical JSON types."""
    if _depth > 128:
        raise CanonicalJSONError("JSON nested too deeply")
    t = type(value)
    if t is str or t is bool or value is None:
        return
    if t is int:
        if not MIN_SAFE_INT <= value <= MAX_SAFE_INT:
            raise CanonicalJSONError(f"integer out of range: {value}")
        return
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise CanonicalJSONError(f"object key is not a string: {k!r}")
            check_canonical(v, _depth + 1)
        return
    if t is list or t is tuple:
        for v in value:
            check_canonical(v, _depth + 1)
        return
    if t is float:
        raise CanonicalJSONError("floats are not allowed in canonical JSON")
    raise CanonicalJSONError(f"not a JSON type: {t.__name__}")


def _reject_constant(name: str) -> Any:
    raise CanonicalJSONError(f"{name} is not allowed in JSON")


def _reject_float(text: str) -> Any:
    raise CanonicalJSONError(f"floats are not allowed: {text}")


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> JsonDict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise CanonicalJSONError(f"duplicate key in object: {k!r}")
            seen.add(k)
    return obj


_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_no_duplicates,
    parse_float=_reject_float,
    parse_constant=_reject_constant,
)


def parse_json(data: bytes | str) -> Any:
    """Parse JSON leniently (any valid JSON, last duplicate key wins). Raises ``ValueError``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(str(exc)) from exc


def parse_canonical(data: bytes | str) -> Any:
    """Parse JSON that must be representable as canonical JSON.

    Raises ``CanonicalJSONError`` for floats, NaN, out-of-range integers or duplicate
    keys, and ``ValueError`` for text that is not JSON at all.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("JSON is not valid UTF-8") from exc
    else:
        text = data
    try:
        value = _STRICT_DECODER.decode(text)
    except CanonicalJSONError:
        raise
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from exc
    check_canonical(value)
    return value

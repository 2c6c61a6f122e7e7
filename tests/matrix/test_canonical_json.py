"""``encode_canonical_json`` against ``canonicaljson`` (the Matrix reference encoder),
and strict parsing: both parsers accept and reject the same inputs."""

from __future__ import annotations

import json
from typing import Any

import canonicaljson
import pytest
from event_strategies import AWKWARD_CHARS, json_values, text
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from warden.matrix.canonical_json import (
    MAX_SAFE_INT,
    MIN_SAFE_INT,
    CanonicalJSONError,
    check_canonical,
    encode_canonical_json,
    parse_canonical,
    parse_canonical_encoded,
    parse_canonical_stdlib,
)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys drawn from a small alphabet of awkward code points so sorting is exercised on
# BMP vs astral, combining marks, and keys that are prefixes of each other.
awkward_keys = st.text(alphabet=st.sampled_from([*AWKWARD_CHARS, "a", "b", "A", "é"]), max_size=4)
awkward_objects: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(MIN_SAFE_INT, MAX_SAFE_INT), text),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(awkward_keys, children, max_size=5)
    ),
    max_leaves=20,
)


@PROPERTY
@given(value=st.one_of(json_values, awkward_objects))
@example(value={"\U0001f600": 1, "\uffff": 2, "\ue000": 3, "a": 4, "": 5})
@example(value=[MAX_SAFE_INT, MIN_SAFE_INT, 0, -0])
@example(value="".join(chr(c) for c in range(0x20)) + '\x7f\u2028\u2029"\\/')
@example(value={"e\u0301": 1, "\u00e9": 2})
def test_encoding_is_byte_identical_to_canonicaljson(value: Any) -> None:
    ours = encode_canonical_json(value)
    assert ours == canonicaljson.encode_canonical_json(value)
    # And it round-trips through both parsers.
    assert parse_canonical(ours) == value
    assert parse_canonical_stdlib(ours) == value


@PROPERTY
@given(value=awkward_objects, indent=st.sampled_from([None, 1, "\t"]))
def test_parsers_agree_on_valid_json(value: Any, indent: Any) -> None:
    # Non-canonical layouts (whitespace, escaped non-ASCII) must parse to the same value.
    for ensure_ascii in (False, True):
        data = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)
        assert parse_canonical(data) == value
        assert parse_canonical(data.encode()) == value
        assert parse_canonical_stdlib(data) == value


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        0.0,
        [1.0],
        {"a": {"b": -2.5e10}},
        MAX_SAFE_INT + 1,
        MIN_SAFE_INT - 1,
        2**64,
        {1: "non-string key"},
        {"a": object()},
        {"a": b"bytes"},
        "lone \ud800 surrogate",
        {"\udc00": 1},
        True and [[[[1.0]]]],
    ],
)
def test_encoding_rejects_non_canonical_values(value: Any) -> None:
    with pytest.raises(CanonicalJSONError):
        encode_canonical_json(value)


def test_encoding_rejects_deep_nesting() -> None:
    value: Any = 1
    for _ in range(200):
        value = [value]
    with pytest.raises(CanonicalJSONError, match="deeply"):
        encode_canonical_json(value)


def test_check_canonical_accepts_edges() -> None:
    check_canonical({"a": [MAX_SAFE_INT, MIN_SAFE_INT, None, True, False, ""]})


BAD_DOCUMENTS: list[tuple[bytes | str, type[Exception], str]] = [
    (b"1.0", CanonicalJSONError, "float"),
    (b'{"a": 1e5}', CanonicalJSONError, "float"),
    (b'{"a": 1E5}', CanonicalJSONError, "float"),
    (b'{"a": -0.0}', CanonicalJSONError, "float"),
    (b"[NaN]", ValueError, ""),
    (b"[Infinity]", ValueError, ""),
    (b"[-Infinity]", ValueError, ""),
    (b"9007199254740992", CanonicalJSONError, ""),
    (b"-9007199254740992", CanonicalJSONError, ""),
    (b"18446744073709551616", CanonicalJSONError, ""),
    (b"-99999999999999999999999", CanonicalJSONError, ""),
    (b'{"a": 1, "a": 2}', CanonicalJSONError, "duplicate"),
    (b'{"a":1,"a":1}', CanonicalJSONError, "duplicate"),
    (b'{"a":{"b":1,"b":1},"c":2}', CanonicalJSONError, "duplicate"),
    (b'{"a": 1, "\\u0061": 2}', CanonicalJSONError, "duplicate"),
    (b'{"x": [{"k": 1, "k": 1}]}', CanonicalJSONError, "duplicate"),
    (b'{"a\\":": 1, "a\\":": 2}', CanonicalJSONError, "duplicate"),
    (b'{"\\\\": 1, "\\\\" : 2}', CanonicalJSONError, "duplicate"),
    (b'"\xff"', ValueError, ""),
    (b'{"a": "\xed\xa0\x80"}', ValueError, ""),  # UTF-8-encoded surrogate
    (b'"\\ud800"', ValueError, ""),
    (b'"\\udc00 x"', ValueError, ""),
    ('"lone \ud800"', ValueError, ""),
    (b"[" * 200 + b"]" * 200, CanonicalJSONError, "deeply"),
    (b"[" * 5000 + b"]" * 5000, ValueError, ""),
    (b"{", ValueError, ""),
    (b"", ValueError, ""),
    (b"[1,]", ValueError, ""),
    (b"{'a': 1}", ValueError, ""),
]


@pytest.mark.parametrize(("data", "error", "match"), BAD_DOCUMENTS)
def test_parsers_reject_non_canonical_documents(
    data: bytes | str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match or None):
        parse_canonical(data)
    with pytest.raises(error, match=match or None):
        parse_canonical_stdlib(data)


def test_duplicate_key_error_names_the_key() -> None:
    with pytest.raises(CanonicalJSONError, match="'sender'"):
        parse_canonical(b'{"sender": "@a:b", "content": {}, "sender": "@c:d"}')


def test_strings_with_quotes_and_colons_parse() -> None:
    doc = b'{"a": "x\\": 1", "b": ["\\"", "\\\\", ":"], "c": {"d\\\\": "e\\" :"}}'
    assert parse_canonical(doc) == json.loads(doc)


@settings(max_examples=200, deadline=None)
@given(value=awkward_objects, data=st.data())
def test_any_duplicated_key_is_detected(value: Any, data: st.DataObject) -> None:
    # Serialise an object with one key written twice, at the top or nested.
    key = data.draw(awkward_keys)
    encoded_key = json.dumps(key, ensure_ascii=data.draw(st.booleans()))
    inner = json.dumps(value)
    doc = "{" + f"{encoded_key}: {inner}, " + f'"pad": [{inner}], {encoded_key}: 1' + "}"
    doc = data.draw(st.sampled_from([doc, f'{{"outer": [{doc}]}}']))
    with pytest.raises(CanonicalJSONError, match="duplicate"):
        parse_canonical(doc)
    with pytest.raises(CanonicalJSONError, match="duplicate"):
        parse_canonical_stdlib(doc)


def test_canonical_text_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import warden.matrix.canonical_json as module

    def fail(data: object) -> None:
        raise AssertionError("stdlib fallback used")

    monkeypatch.setattr(module, "parse_canonical_stdlib", fail)
    doc = {"content": {"body": "\u2028 \U0001f600"}, "depth": 3, "type": "m.room.message"}
    assert module.parse_canonical(encode_canonical_json(doc)) == doc
    # Non-canonical text (here: unsorted keys) is re-checked by the stdlib parser.
    with pytest.raises(AssertionError, match="fallback"):
        module.parse_canonical(b'{"type":"x","depth":3}')


@PROPERTY
@given(
    value=st.one_of(json_values, awkward_objects),
    indent=st.sampled_from([None, 1]),
    ensure_ascii=st.booleans(),
    sort_keys=st.booleans(),
)
def test_parse_encoded_returns_the_canonical_encoding(
    value: Any, indent: Any, ensure_ascii: bool, sort_keys: bool
) -> None:
    canonical = encode_canonical_json(value)
    layouts = [
        canonical,
        json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys).encode(),
    ]
    for data in layouts:
        parsed, encoded = parse_canonical_encoded(data)
        assert parsed == parse_canonical(data) == value
        assert encoded == canonical


@pytest.mark.parametrize(("data", "error", "match"), BAD_DOCUMENTS)
def test_parse_encoded_rejects_what_parse_canonical_rejects(
    data: bytes | str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match or None):
        parse_canonical_encoded(data)


def test_parse_encoded_detects_duplicate_keys() -> None:
    with pytest.raises(CanonicalJSONError, match="'a'"):
        parse_canonical_encoded(b'{"a":1,"a":1}')
    with pytest.raises(CanonicalJSONError, match="'b'"):
        parse_canonical_encoded(b'{"x":[{"b":2,"b":2}]}')

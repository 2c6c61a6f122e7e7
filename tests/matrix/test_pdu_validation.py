"""Structural PDU validation per room version."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from event_strategies import ALL_VERSIONS, events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.events import make_event_from_dict

from warden.matrix.canonical_json import MAX_SAFE_INT
from warden.matrix.errors import BadJSON
from warden.matrix.pdu import InvalidPDU, validate_pdu
from warden.matrix.room_versions import get_room_version


@pytest.mark.parametrize("version", ALL_VERSIONS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_events_are_valid_and_synapse_agrees(version: str, data: st.DataObject) -> None:
    event = data.draw(events(version))
    assert validate_pdu(get_room_version(version), event) is event
    # Synapse's parser accepts it too (it raises on malformed events).
    make_event_from_dict(copy.deepcopy(event), SYNAPSE_VERSIONS[version])


def _pdu(version: str, **overrides: Any) -> dict[str, Any]:
    pdu: dict[str, Any] = {
        "type": "m.room.message",
        "room_id": "!r:example.org" if int(version) < 12 else "!" + "A" * 43,
        "sender": "@a:example.org",
        "content": {"body": "hi"},
        "depth": 4,
        "origin_server_ts": 1700000000000,
        "prev_events": ["$" + "B" * 43],
        "auth_events": ["$" + "C" * 43],
        "hashes": {"sha256": "D" * 43},
        "signatures": {"example.org": {"ed25519:a": "sig"}},
    }
    if version in ("1", "2"):
        pdu["event_id"] = "$e:example.org"
        pdu["prev_events"] = [["$p:example.org", {"sha256": "x"}]]
        pdu["auth_events"] = [["$a:example.org", {"sha256": "y"}]]
    for key, value in overrides.items():
        if value is _DROP:
            pdu.pop(key, None)
        else:
            pdu[key] = value
    return pdu


_DROP = object()


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_baseline_pdu_is_valid(version: str) -> None:
    validate_pdu(get_room_version(version), _pdu(version))


REQUIRED = [
    "type",
    "room_id",
    "sender",
    "content",
    "depth",
    "origin_server_ts",
    "prev_events",
    "auth_events",
    "hashes",
    "signatures",
]


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("key", REQUIRED)
def test_missing_required_key_is_named(version: str, key: str) -> None:
    with pytest.raises(InvalidPDU, match=f"'{key}' is missing") as info:
        validate_pdu(get_room_version(version), _pdu(version, **{key: _DROP}))
    assert info.value.key == key
    assert info.value.to_dict()["errcode"] == "M_BAD_JSON"
    assert isinstance(info.value, BadJSON)
    assert isinstance(info.value, ValueError)


BAD_VALUES: list[tuple[str, object, str]] = [
    ("type", 5, "type"),
    ("room_id", "no-sigil:example.org", "room_id"),
    ("room_id", ["!r:x"], "room_id"),
    ("sender", "a:example.org", "sender"),
    ("sender", "@nocolon", "sender"),
    ("sender", "@" + "a" * 250 + ":example.org", "sender"),
    ("state_key", 5, "state_key"),
    ("state_key", "x" * 256, "state_key"),
    ("content", [], "content"),
    ("content", {"f": 1.5}, "content"),
    ("content", {"n": MAX_SAFE_INT + 1}, "content"),
    ("depth", "4", "depth"),
    ("depth", True, "depth"),
    ("depth", -1, "depth"),
    ("depth", 4.0, "depth"),
    ("origin_server_ts", None, "origin_server_ts"),
    ("origin_server_ts", 2**60, "origin_server_ts"),
    ("prev_events", "$x", "prev_events"),
    ("hashes", {"sha512": "x"}, "hashes.sha256"),
    ("hashes", {"sha256": 5}, "hashes.sha256"),
    ("hashes", "x", "hashes"),
    ("signatures", {"example.org": "sig"}, "signatures.example.org"),
    ("signatures", {"example.org": {"ed25519:a": 5}}, "signatures.example.org.ed25519:a"),
    ("signatures", [], "signatures"),
    ("unsigned", [], "unsigned"),
    ("redacts", 5, "redacts"),
]


@pytest.mark.parametrize("version", ["1", "6", "12"])
@pytest.mark.parametrize(("key", "value", "named"), BAD_VALUES)
def test_bad_values_are_named(version: str, key: str, value: object, named: str) -> None:
    with pytest.raises(InvalidPDU) as info:
        validate_pdu(get_room_version(version), _pdu(version, **{key: value}))
    assert info.value.key == named
    assert f"'{named}'" in str(info.value)


@pytest.mark.parametrize("version", ["3", "4", "10", "11", "12"])
@pytest.mark.parametrize("refs", [[["$p:example.org", {"sha256": "x"}]], [5], ["no-sigil"], [None]])
def test_v3_plus_event_refs_are_id_strings(version: str, refs: list[object]) -> None:
    with pytest.raises(InvalidPDU, match=r"prev_events\[0\]"):
        validate_pdu(get_room_version(version), _pdu(version, prev_events=refs))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize(
    "refs",
    [["$" + "B" * 43], [["$p:example.org"]], [["$p:example.org", "hash"]], [["p", {}]]],
)
def test_v1_v2_event_refs_are_pairs(version: str, refs: list[object]) -> None:
    with pytest.raises(InvalidPDU, match=r"auth_events\[0\]"):
        validate_pdu(get_room_version(version), _pdu(version, auth_events=refs))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("event_id", [_DROP, 5, "$nocolon", "e:example.org"])
def test_v1_v2_need_an_event_id(version: str, event_id: object) -> None:
    with pytest.raises(InvalidPDU, match="'event_id'"):
        validate_pdu(get_room_version(version), _pdu(version, event_id=event_id))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize(
    ("event_id", "problem"),
    [
        ("$a\r\nWarden-Event-Id: $b:x:example.org", "control characters or whitespace"),
        ("$a:example.org\n", "control characters or whitespace"),
        ("$a b:example.org", "control characters or whitespace"),
        ("$a\x00:example.org", "control characters or whitespace"),
        ("$a\x7f:example.org", "control characters or whitespace"),
        ("$a\x85:example.org", "control characters or whitespace"),
        ("$a\u2028:example.org", "control characters or whitespace"),
        ("$a\u00a0:example.org", "control characters or whitespace"),
        ("$:example.org", "'\\$opaque:server'"),
        ("$" + "a" * 250 + ":example.org", "longer than 255 bytes"),
        # 250 characters but more than 255 bytes: bytes count, whatever the version.
        ("$" + "é" * 130 + ":example.org", "longer than 255 bytes"),
    ],
)
def test_v1_v2_event_ids_are_safe_as_keys_and_headers(
    version: str, event_id: str, problem: str
) -> None:
    # Review L4: the ID becomes a NATS header, a Redis key and a database key.
    with pytest.raises(InvalidPDU, match=problem) as caught:
        validate_pdu(get_room_version(version), _pdu(version, event_id=event_id))
    assert caught.value.errcode == "M_BAD_JSON"


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize(
    "event_id", ["$a:example.org", "$é-ü:example.org:8448", "$" + "a" * 200 + ":x"]
)
def test_v1_v2_ordinary_event_ids_pass(version: str, event_id: str) -> None:
    validate_pdu(get_room_version(version), _pdu(version, event_id=event_id))


def test_v12_create_has_no_room_id_and_others_must() -> None:
    v12 = get_room_version("12")
    create = _pdu("12", type="m.room.create", state_key="", room_id=_DROP)
    validate_pdu(v12, create)
    with pytest.raises(InvalidPDU, match="must be absent"):
        validate_pdu(v12, {**create, "room_id": "!" + "A" * 43})
    with pytest.raises(InvalidPDU, match="'room_id' is missing"):
        validate_pdu(get_room_version("11"), _pdu("11", type="m.room.create", room_id=_DROP))
    # v12 room IDs have no server part; earlier ones must.
    with pytest.raises(InvalidPDU, match="room_id"):
        validate_pdu(get_room_version("11"), _pdu("11", room_id="!" + "A" * 43))


def test_size_limits_count_bytes_from_v11_and_code_points_before() -> None:
    state_key = "é" * 200  # 200 code points, 400 bytes
    validate_pdu(get_room_version("10"), _pdu("10", state_key=state_key))
    with pytest.raises(InvalidPDU, match="state_key"):
        validate_pdu(get_room_version("11"), _pdu("11", state_key=state_key))


@pytest.mark.parametrize("pdu", [None, [], "x", 5])
def test_non_objects_are_refused(pdu: object) -> None:
    with pytest.raises(InvalidPDU, match="JSON object"):
        validate_pdu(get_room_version("10"), pdu)

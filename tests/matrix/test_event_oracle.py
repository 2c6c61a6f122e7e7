"""Redaction, content hashes, reference hashes, event IDs and v12 room IDs, held against
Synapse's own implementation for every stable room version (1-12)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest
from event_strategies import ALL_VERSIONS, events, safe_ints
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto import event_signing as syn_signing
from synapse.events import make_event_from_dict
from synapse.synapse_rust.events import redact_event_dict
from unpaddedbase64 import encode_base64

from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.event_hashes import (
    EventIDError,
    add_content_hash,
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    compute_reference_hash,
    room_id_from_create_event,
)
from warden.matrix.redaction import redact_event
from warden.matrix.room_versions import get_room_version

ORACLE_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _synapse_redacted(version: str, event: dict[str, Any]) -> dict[str, Any]:
    redacted = redact_event_dict(SYNAPSE_VERSIONS[version], event)
    # Synapse keeps unsigned.age_ts/replaces_state; the spec (and we) keep no unsigned.
    redacted.pop("unsigned", None)
    return redacted


@pytest.mark.parametrize("version", ALL_VERSIONS)
@ORACLE_SETTINGS
@given(data=st.data())
def test_redaction_matches_synapse(version: str, data: st.DataObject) -> None:
    event = data.draw(events(version))
    before = copy.deepcopy(event)
    ours = redact_event(get_room_version(version), event)
    assert encode_canonical_json(ours) == encode_canonical_json(_synapse_redacted(version, event))
    assert event == before, "redact_event must not modify its input"
    assert "unsigned" not in ours


@pytest.mark.parametrize("version", ALL_VERSIONS)
@ORACLE_SETTINGS
@given(data=st.data())
def test_hashes_and_event_id_match_synapse(version: str, data: st.DataObject) -> None:
    event = data.draw(events(version))
    room_version = get_room_version(version)

    name, synapse_content_hash = syn_signing.compute_content_hash(event, hashlib.sha256)
    assert name == "sha256"
    assert compute_content_hash(event) == synapse_content_hash

    # Put a correct content hash in, then compare everything derived from the event.
    add_content_hash(event)
    assert check_content_hash(event)
    syn_event = make_event_from_dict(copy.deepcopy(event), SYNAPSE_VERSIONS[version])
    assert syn_signing.check_event_content_hash(syn_event)

    _, synapse_reference = syn_signing.compute_event_reference_hash(syn_event)
    assert compute_reference_hash(room_version, event) == synapse_reference
    assert compute_event_id(room_version, event) == syn_event.event_id

    if version == "12" and event["type"] == "m.room.create":
        assert room_id_from_create_event(event) == syn_event.room_id


@pytest.mark.parametrize("version", ALL_VERSIONS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_content_edits_break_the_content_hash(version: str, data: st.DataObject) -> None:
    event = data.draw(events(version))
    add_content_hash(event)
    event["content"] = {**event["content"], "warden-tamper": data.draw(safe_ints)}
    assert not check_content_hash(event)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_v12_room_id_matches_synapse(data: st.DataObject) -> None:
    create = data.draw(events("12"))
    create["type"] = "m.room.create"
    create["state_key"] = ""
    create.pop("room_id", None)
    content = dict(create["content"])
    content["room_version"] = "12"
    create["content"] = content
    syn_event = make_event_from_dict(copy.deepcopy(create), SYNAPSE_VERSIONS["12"])
    room_id = room_id_from_create_event(create)
    assert room_id == syn_event.room_id
    assert room_id == "!" + syn_event.event_id[1:]


def test_event_id_alphabets_differ_between_v3_and_v4() -> None:
    # Search for an event whose reference hash has a '+' or '/' in standard base64.
    base = {
        "type": "m.room.message",
        "room_id": "!r:example.org",
        "sender": "@a:example.org",
        "content": {},
        "depth": 1,
        "origin_server_ts": 0,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    for i in range(200):
        ev = {**base, "depth": i}
        v3_id = compute_event_id(get_room_version("3"), ev)
        if "+" in v3_id or "/" in v3_id:
            v4_id = compute_event_id(get_room_version("4"), ev)
            assert "+" not in v4_id and "/" not in v4_id
            digest = compute_reference_hash(get_room_version("4"), ev)
            assert v4_id == "$" + encode_base64(digest, urlsafe=True)
            assert v3_id == "$" + encode_base64(digest)
            return
    pytest.fail("no event ID with '+' or '/' found")


@pytest.mark.parametrize("bad", [None, 5, "no-sigil:example.org", "$nocolon", "$x:"])
def test_v1_event_id_must_be_present_and_well_formed(bad: object) -> None:
    event: dict[str, Any] = {"type": "m.room.message", "content": {}}
    if bad is not None:
        event["event_id"] = bad
    with pytest.raises(EventIDError):
        compute_event_id(get_room_version("1"), event)


def test_room_id_from_create_event_refuses_old_versions_and_other_types() -> None:
    create = {"type": "m.room.create", "state_key": "", "content": {"room_version": "11"}}
    with pytest.raises(ValueError, match="does not derive"):
        room_id_from_create_event(create)
    with pytest.raises(ValueError, match="does not derive"):
        room_id_from_create_event({**create, "content": {}})  # default room version "1"
    with pytest.raises(ValueError, match=r"m\.room\.create"):
        room_id_from_create_event(
            {"type": "m.room.member", "content": {"room_version": "12"}},
        )


@pytest.mark.parametrize(
    "hashes", [None, "abc", {}, {"sha256": 5}, {"sha256": "not base64!"}, {"sha256": "é"}]
)
def test_check_content_hash_is_false_for_malformed_hashes(hashes: object) -> None:
    event: dict[str, Any] = {"type": "m.room.message", "content": {"body": "hi"}}
    if hashes is not None:
        event["hashes"] = hashes
    assert check_content_hash(event) is False


def test_check_content_hash_is_false_for_non_canonical_events() -> None:
    event: dict[str, Any] = {"type": "t", "content": {"n": 1}}
    add_content_hash(event)
    event["content"]["n"] = 1.0  # equal in Python, but not canonical JSON
    assert check_content_hash(event) is False


def test_add_content_hash_keeps_other_algorithms() -> None:
    event: dict[str, Any] = {"type": "t", "content": {}, "hashes": {"sha512": "zz"}}
    digest = add_content_hash(event)
    assert event["hashes"] == {"sha512": "zz", "sha256": digest}
    assert check_content_hash(event)

"""Event signatures, held against Synapse's ``synapse.crypto.event_signing``: signatures
made by either side verify with the other, and tampering is caught."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from event_strategies import ALL_VERSIONS, events, json_values, text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto import event_signing as syn_signing
from synapse.synapse_rust.events import redact_event_dict

from warden.matrix.event_hashes import check_content_hash
from warden.matrix.event_signing import (
    EventSignatureError,
    compute_event_signature,
    servers_required_to_sign,
    sign_event,
    verify_event_signature,
    verify_sender_signature,
)
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version

SIGNING_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ORIGIN_KEY = generate_signing_key("a_orig")
ORIGIN_KEY_ID = "ed25519:a_orig"
POLICY_KEY = generate_signing_key("policy_server")
OTHER_KEY = generate_signing_key("policy_server")


def _synapse_verifies(version: str, event: dict[str, Any], server: str, key: Any) -> bool:
    """Synapse's way: redact, strip unsigned, then signedjson verification."""
    redacted = redact_event_dict(SYNAPSE_VERSIONS[version], event)
    redacted.pop("unsigned", None)
    redacted.pop("age_ts", None)
    try:
        verify_signed_json(redacted, server, get_verify_key(key))
    except Exception:
        return False
    return True


@pytest.mark.parametrize("version", ALL_VERSIONS)
@SIGNING_SETTINGS
@given(data=st.data())
def test_signatures_agree_with_synapse(version: str, data: st.DataObject) -> None:
    event = data.draw(events(version))
    room_version = get_room_version(version)

    # Synapse signs as the origin (adding the content hash); we countersign as policy server.
    syn_signing.add_hashes_and_signatures(
        SYNAPSE_VERSIONS[version], event, "origin.test", ORIGIN_KEY
    )
    assert check_content_hash(event)
    assert verify_event_signature(
        room_version, event, "origin.test", ORIGIN_KEY_ID, get_verify_key(ORIGIN_KEY)
    )

    ours = compute_event_signature(
        room_version, event, "policy.test", POLICY_KEY, POLICY_SERVER_KEY_ID
    )
    theirs = syn_signing.compute_event_signature(
        SYNAPSE_VERSIONS[version], event, "policy.test", POLICY_KEY
    )
    # ed25519 is deterministic: the same bytes signed give the same signature.
    # (Synapse returns the event's other signatures alongside the new one.)
    assert ours == {"policy.test": theirs["policy.test"]}

    before = copy.deepcopy(event)
    returned = sign_event(room_version, event, "policy.test", POLICY_KEY, POLICY_SERVER_KEY_ID)
    assert returned == ours
    assert event["signatures"]["origin.test"] == before["signatures"]["origin.test"]
    assert event["signatures"]["policy.test"] == ours["policy.test"]
    assert _synapse_verifies(version, event, "policy.test", POLICY_KEY)
    assert _synapse_verifies(version, event, "origin.test", ORIGIN_KEY)

    # A signature survives redaction: the redacted event still verifies.
    redacted = redact_event_dict(SYNAPSE_VERSIONS[version], event)
    assert verify_event_signature(
        room_version, redacted, "policy.test", POLICY_SERVER_KEY_ID, get_verify_key(POLICY_KEY)
    )


@pytest.mark.parametrize("version", ALL_VERSIONS)
@SIGNING_SETTINGS
@given(data=st.data())
def test_tampering_is_caught(version: str, data: st.DataObject) -> None:
    event = data.draw(events(version))
    room_version = get_room_version(version)
    sign_event(room_version, event, "policy.test", POLICY_KEY, POLICY_SERVER_KEY_ID)
    verify_key = get_verify_key(POLICY_KEY)
    assert verify_event_signature(
        room_version, event, "policy.test", POLICY_SERVER_KEY_ID, verify_key
    )

    # Wrong key: same key ID, different key pair.
    assert not verify_event_signature(
        room_version, event, "policy.test", POLICY_SERVER_KEY_ID, get_verify_key(OTHER_KEY)
    )
    # Wrong server name or key ID: there is no such signature.
    assert not verify_event_signature(
        room_version, event, "other.test", POLICY_SERVER_KEY_ID, verify_key
    )
    assert not verify_event_signature(room_version, event, "policy.test", "ed25519:x", verify_key)

    # Editing a field that survives redaction breaks the signature.
    tampered = copy.deepcopy(event)
    field = data.draw(st.sampled_from(["sender", "depth", "origin_server_ts", "type"]))
    if field == "sender":
        tampered["sender"] = tampered["sender"] + "x"
    elif field == "type":
        tampered["type"] = tampered["type"] + "x"
    else:
        tampered[field] = tampered[field] + 1
    assert not verify_event_signature(
        room_version, tampered, "policy.test", POLICY_SERVER_KEY_ID, verify_key
    )
    assert not _synapse_verifies(version, tampered, "policy.test", POLICY_KEY)

    # Content edits: breaks the signature when the edited key survives redaction,
    # and always breaks the content hash; editing unsigned breaks neither.
    edited = copy.deepcopy(event)
    edited["content"] = {**edited["content"], data.draw(text): data.draw(json_values)}
    redacts_same = redact_event_dict(SYNAPSE_VERSIONS[version], edited) == redact_event_dict(
        SYNAPSE_VERSIONS[version], event
    )
    assert (
        verify_event_signature(
            room_version, edited, "policy.test", POLICY_SERVER_KEY_ID, verify_key
        )
        == redacts_same
    )
    with_unsigned = {**event, "unsigned": {"age": 5}}
    assert verify_event_signature(
        room_version, with_unsigned, "policy.test", POLICY_SERVER_KEY_ID, verify_key
    )


def test_content_edit_to_kept_key_breaks_policy_signature() -> None:
    room_version = get_room_version("11")
    event: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": "@u:example.org",
        "room_id": "!r:example.org",
        "sender": "@u:example.org",
        "content": {"membership": "join"},
        "depth": 3,
        "origin_server_ts": 1,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    sign_event(room_version, event, "policy.test", POLICY_KEY, POLICY_SERVER_KEY_ID)
    event["content"]["membership"] = "ban"
    assert not verify_event_signature(
        room_version, event, "policy.test", POLICY_SERVER_KEY_ID, get_verify_key(POLICY_KEY)
    )


@pytest.mark.parametrize("signature", [5, "", "!!!", "é", "AAAA", None])
def test_malformed_signatures_do_not_verify(signature: object) -> None:
    event: dict[str, Any] = {
        "type": "m.room.message",
        "content": {},
        "signatures": {"policy.test": {POLICY_SERVER_KEY_ID: signature}},
    }
    assert not verify_event_signature(
        get_room_version("10"),
        event,
        "policy.test",
        POLICY_SERVER_KEY_ID,
        get_verify_key(POLICY_KEY),
    )


def _member(version: str, **content: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "m.room.member",
        "state_key": "@joiner:joiner.test",
        "room_id": "!r:example.org",
        "sender": "@joiner:joiner.test",
        "content": {"membership": "join", **content},
        "depth": 3,
        "origin_server_ts": 1,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    if version in ("1", "2"):
        event["event_id"] = "$abc:minter.test"
    return event


@pytest.mark.parametrize(
    ("version", "content", "expected"),
    [
        ("1", {}, {"joiner.test", "minter.test"}),
        ("3", {}, {"joiner.test"}),
        ("7", {"join_authorised_via_users_server": "@res:resident.test"}, {"joiner.test"}),
        (
            "8",
            {"join_authorised_via_users_server": "@res:resident.test"},
            {"joiner.test", "resident.test"},
        ),
        (
            "12",
            {"join_authorised_via_users_server": "@res:resident.test"},
            {"joiner.test", "resident.test"},
        ),
    ],
)
def test_servers_required_to_sign(
    version: str, content: dict[str, Any], expected: set[str]
) -> None:
    event = _member(version, **content)
    assert servers_required_to_sign(get_room_version(version), event) == expected


def test_third_party_invites_are_exempt_from_the_sender_signature() -> None:
    event = _member("10", third_party_invite={"signed": {}})
    event["content"]["membership"] = "invite"
    assert servers_required_to_sign(get_room_version("10"), event) == frozenset()


def test_malformed_ids_raise_from_servers_required_to_sign() -> None:
    event = _member("10")
    event["sender"] = "nocolon"
    with pytest.raises(EventSignatureError, match="sender"):
        servers_required_to_sign(get_room_version("10"), event)


def test_verify_sender_signature_needs_every_required_server() -> None:
    version = "10"
    room_version = get_room_version(version)
    joiner_key = generate_signing_key("j1")
    resident_key = generate_signing_key("r1")
    event = _member(version, join_authorised_via_users_server="@res:resident.test")
    sign_event(room_version, event, "joiner.test", joiner_key, "ed25519:j1")
    keys = {
        "joiner.test": {"ed25519:j1": get_verify_key(joiner_key)},
        "resident.test": {"ed25519:r1": get_verify_key(resident_key)},
    }
    with pytest.raises(EventSignatureError, match=r"not signed by resident\.test"):
        verify_sender_signature(room_version, event, keys)

    sign_event(room_version, event, "resident.test", resident_key, "ed25519:r1")
    verify_sender_signature(room_version, event, keys)  # both present: no error

    # A signature with a key we do not hold does not count...
    with pytest.raises(EventSignatureError, match="known key"):
        verify_sender_signature(
            room_version,
            event,
            {**keys, "resident.test": {"ed25519:other": keys["joiner.test"]["ed25519:j1"]}},
        )
    # ...and one that fails with a key we hold is an error even if another is fine.
    event["signatures"]["joiner.test"]["ed25519:j2"] = event["signatures"]["joiner.test"][
        "ed25519:j1"
    ]
    bad_keys = {
        **keys,
        "joiner.test": {**keys["joiner.test"], "ed25519:j2": get_verify_key(resident_key)},
    }
    with pytest.raises(EventSignatureError, match="does not verify"):
        verify_sender_signature(room_version, event, bad_keys)


def test_v1_event_needs_the_event_id_servers_signature() -> None:
    room_version = get_room_version("1")
    joiner_key = generate_signing_key("j1")
    event = _member("1")
    sign_event(room_version, event, "joiner.test", joiner_key, "ed25519:j1")
    keys = {"joiner.test": {"ed25519:j1": get_verify_key(joiner_key)}}
    with pytest.raises(EventSignatureError, match=r"minter\.test"):
        verify_sender_signature(room_version, event, keys)

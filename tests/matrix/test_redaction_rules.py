"""The redaction rules version by version, written out from the spec, and each case also
checked against Synapse (the property tests cover random events; these make sure every
special rule is exercised in every version)."""

from __future__ import annotations

from typing import Any

import pytest
from event_strategies import ALL_VERSIONS
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.synapse_rust.events import redact_event_dict

from warden.matrix.redaction import redact_event
from warden.matrix.room_versions import get_room_version

FULL_CONTENT: dict[str, dict[str, Any]] = {
    "m.room.member": {
        "membership": "join",
        "join_authorised_via_users_server": "@res:example.org",
        "third_party_invite": {"signed": {"mxid": "@u:x", "token": "t"}, "display_name": "d"},
        "displayname": "name",
    },
    "m.room.create": {"creator": "@c:example.org", "room_version": "1", "m.federate": False},
    "m.room.join_rules": {"join_rule": "restricted", "allow": [{"type": "x"}], "extra": 1},
    "m.room.power_levels": {
        "ban": 50,
        "events": {"m.room.name": 50},
        "events_default": 0,
        "invite": 0,
        "kick": 50,
        "redact": 50,
        "state_default": 50,
        "users": {"@a:b": 100},
        "users_default": 0,
        "notifications": {"room": 50},
    },
    "m.room.history_visibility": {"history_visibility": "shared", "extra": 1},
    "m.room.aliases": {"aliases": ["#a:example.org"], "extra": 1},
    "m.room.redaction": {"redacts": "$target", "reason": "spam"},
    "m.room.message": {"body": "hello", "msgtype": "m.text"},
}

PL_BASE = {
    "ban",
    "events",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
}


def expected_content_keys(version: int, event_type: str) -> set[str]:
    """The spec's table of content keys kept, by room version."""
    v11 = version >= 11
    if event_type == "m.room.member":
        keys = {"membership"}
        if version >= 9:
            keys.add("join_authorised_via_users_server")
        if v11:
            keys.add("third_party_invite")
        return keys
    if event_type == "m.room.create":
        return set(FULL_CONTENT["m.room.create"]) if v11 else {"creator"}
    if event_type == "m.room.join_rules":
        return {"join_rule", "allow"} if version >= 8 else {"join_rule"}
    if event_type == "m.room.power_levels":
        return PL_BASE | {"invite"} if v11 else PL_BASE
    if event_type == "m.room.history_visibility":
        return {"history_visibility"}
    if event_type == "m.room.aliases":
        return {"aliases"} if version <= 5 else set()
    if event_type == "m.room.redaction":
        return {"redacts"} if v11 else set()
    return set()


def _event(version: int, event_type: str) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": event_type,
        "room_id": "!r:example.org",
        "sender": "@s:example.org",
        "state_key": "",
        "content": dict(FULL_CONTENT[event_type]),
        "depth": 5,
        "origin_server_ts": 1000,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "h"},
        "signatures": {"example.org": {"ed25519:a": "sig"}},
        "unsigned": {"age_ts": 1, "replaces_state": "$x"},
        "origin": "example.org",
        "membership": "join",
        "prev_state": [],
        "redacts": "$target",
        "extra_top_level": {"x": 1},
    }
    if version <= 2:
        event["event_id"] = "$e:example.org"
    return event


@pytest.mark.parametrize("version", ALL_VERSIONS)
@pytest.mark.parametrize("event_type", list(FULL_CONTENT))
def test_redaction_table(version: str, event_type: str) -> None:
    n = int(version)
    event = _event(n, event_type)
    redacted = redact_event(get_room_version(version), event)

    assert set(redacted["content"]) == expected_content_keys(n, event_type)
    expected_top = {
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "depth",
        "origin_server_ts",
        "prev_events",
        "auth_events",
        "hashes",
        "signatures",
    }
    if n <= 2:
        expected_top.add("event_id")
    if n <= 10:
        expected_top |= {"origin", "membership", "prev_state"}
    if n >= 12 and event_type == "m.room.create":
        expected_top.remove("room_id")  # a v12 create event has no room ID
    assert set(redacted) == expected_top

    theirs = redact_event_dict(SYNAPSE_VERSIONS[version], event)
    theirs.pop("unsigned")
    assert redacted == theirs


@pytest.mark.parametrize("version", ["11", "12"])
@pytest.mark.parametrize(
    ("invite", "expected"),
    [
        ({"signed": {"a": 1}, "display_name": "d"}, {"signed": {"a": 1}}),
        ({"display_name": "d"}, {}),
        ("not an object", None),
    ],
)
def test_third_party_invite_signed_is_kept_from_v11(
    version: str, invite: object, expected: object
) -> None:
    event = {
        "type": "m.room.member",
        "content": {"membership": "invite", "third_party_invite": invite},
    }
    redacted = redact_event(get_room_version(version), event)
    assert redacted["content"].get("third_party_invite") == expected
    theirs = redact_event_dict(SYNAPSE_VERSIONS[version], event)
    assert theirs == redacted


@pytest.mark.parametrize("content", [None, [1], "x"])
def test_non_object_content_redacts_to_empty(content: object) -> None:
    event: dict[str, Any] = {"type": "m.room.create"}
    if content is not None:
        event["content"] = content
    assert redact_event(get_room_version("11"), event) == {"type": "m.room.create", "content": {}}


def test_input_is_not_modified_and_content_is_a_new_dict() -> None:
    event = _event(11, "m.room.create")
    redacted = redact_event(get_room_version("11"), event)
    redacted["content"]["new"] = 1
    assert "new" not in event["content"]

"""Room version facts, held against Synapse's ``KNOWN_ROOM_VERSIONS``."""

from __future__ import annotations

import pytest
from event_strategies import ALL_VERSIONS
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS

from warden.matrix.errors import UnsupportedRoomVersion
from warden.matrix.room_versions import (
    KNOWN_ROOM_VERSIONS,
    EventFormat,
    UnknownRoomVersionError,
    get_room_version,
)

# Our field name -> Synapse's attribute name.
FLAG_NAMES = {
    "enforce_key_validity": "enforce_key_validity",
    "special_case_aliases_auth": "special_case_aliases_auth",
    "strict_canonicaljson": "strict_canonicaljson",
    "limit_notifications_power_levels": "limit_notifications_power_levels",
    "implicit_room_creator": "implicit_room_creator",
    "updated_redaction_rules": "updated_redaction_rules",
    "restricted_join_rule": "restricted_join_rule",
    "restricted_join_rule_fix": "restricted_join_rule_fix",
    "knock_join_rule": "knock_join_rule",
    "knock_restricted_join_rule": "knock_restricted_join_rule",
    "enforce_int_power_levels": "enforce_int_power_levels",
    "strict_event_byte_limits": "strict_event_byte_limits_room_versions",
    "creator_power": "msc4289_creator_power_enabled",
    "room_ids_as_hashes": "msc4291_room_ids_as_hashes",
}


def test_known_versions_are_exactly_the_stable_ones() -> None:
    assert list(KNOWN_ROOM_VERSIONS) == ALL_VERSIONS
    stable = {k for k, v in SYNAPSE_VERSIONS.items() if v.disposition == "stable"}
    assert set(KNOWN_ROOM_VERSIONS) == stable


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_flags_match_synapse(version: str) -> None:
    ours = get_room_version(version)
    theirs = SYNAPSE_VERSIONS[version]
    assert ours.identifier == theirs.identifier
    assert int(ours.event_format) == theirs.event_format
    for our_name, their_name in FLAG_NAMES.items():
        assert getattr(ours, our_name) == getattr(theirs, their_name), our_name
    # Synapse flags we do not model must be off for every stable version.
    assert not theirs.msc3389_relation_redactions
    assert not theirs.msc3757_enabled
    assert not theirs.msc4242_state_dags


def test_event_format_helpers() -> None:
    assert get_room_version("2").event_id_in_json
    assert not get_room_version("3").event_id_in_json
    assert get_room_version("3").event_format is EventFormat.V3
    assert get_room_version("11").event_format is EventFormat.V4_PLUS
    assert get_room_version("12").event_format is EventFormat.V12_PLUS


@pytest.mark.parametrize("bad", ["0", "13", "org.matrix.hydra.11", "", "1.0", None, ["1"]])
def test_unknown_versions_are_refused(bad: object) -> None:
    with pytest.raises(UnknownRoomVersionError, match="unsupported room version") as info:
        get_room_version(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, UnsupportedRoomVersion)
    assert isinstance(info.value, ValueError)
    assert info.value.to_dict()["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"


def test_room_versions_are_immutable() -> None:
    rv = get_room_version("10")
    with pytest.raises(AttributeError):
        rv.identifier = "11"  # type: ignore[misc]
    with pytest.raises(TypeError):
        KNOWN_ROOM_VERSIONS["13"] = rv  # type: ignore[index]

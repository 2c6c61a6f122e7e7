"""The auth rules as far as learned state can check them (``warden.matrix.state_auth``):
pure checks, no services."""

from __future__ import annotations

from typing import Any

import pytest

from warden.matrix.room_versions import get_room_version
from warden.matrix.state_auth import AuthState, check_event, is_valid_user_id

MOD, EVE, NEW = "@mod:a.org", "@eve:b.org", "@new:c.org"


def auth(
    version: str = "10",
    *,
    pl: dict[str, Any] | None = None,
    rule: str | None = "public",
    sender: str | None = "join",
    target: str | None = None,
    authoriser: str | None = None,
) -> AuthState:
    return AuthState(
        room_version=get_room_version(version),
        create={"room_version": version, "creator": MOD},
        create_sender=MOD,
        power_levels={"users": {MOD: 100, EVE: 10}} if pl is None else pl,
        join_rule=rule,
        sender_membership=sender,
        target_membership=target,
        authoriser_membership=authoriser,
    )


def ev(event_type: str, sender: str, content: dict[str, Any], state_key: str | None = None) -> Any:
    event: dict[str, Any] = {"type": event_type, "sender": sender, "content": content}
    if state_key is not None:
        event["state_key"] = state_key
    return event


def member(sender: str, target: str, membership: str, **content: Any) -> Any:
    return ev("m.room.member", sender, {"membership": membership, **content}, target)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("@a:b.org", True),
        ("@a:b.org:8448", True),
        ("@a:[::1]:8448", True),
        ("a", False),
        ("@a", False),
        ("@:b.org", False),
        ("@a b:c.org", False),
        ("@" + "a" * 300 + ":b.org", False),
        (7, False),
    ],
)
def test_user_ids(value: object, valid: bool) -> None:
    assert is_valid_user_id(value) is valid


def test_joins_follow_the_join_rule_bans_and_invites() -> None:
    assert check_event(member(NEW, NEW, "join"), auth(sender=None)) is None
    assert check_event(member(NEW, NEW, "join"), auth(sender=None, target="ban")) is not None
    assert check_event(member(EVE, NEW, "join"), auth()) is not None  # not one's own
    invite_only = auth(rule="invite", sender=None)
    assert check_event(member(NEW, NEW, "join"), invite_only) is not None
    invited = auth(rule="invite", sender="invite", target="invite")
    assert check_event(member(NEW, NEW, "join"), invited) is None
    assert check_event(member(NEW, NEW, "join"), auth(rule=None, sender=None)) is not None
    via = {"join_authorised_via_users_server": MOD}
    restricted = auth(rule="restricted", sender=None, authoriser="join")
    assert check_event(member(NEW, NEW, "join", **via), restricted) is None
    not_member = auth(rule="restricted", sender=None, authoriser=None)
    assert check_event(member(NEW, NEW, "join", **via), not_member) is not None
    weak = {"join_authorised_via_users_server": EVE}
    pl = {"users": {MOD: 100, EVE: 10}, "invite": 50}
    restricted_pl = auth(rule="restricted", sender=None, authoriser="join", pl=pl)
    assert check_event(member(NEW, NEW, "join", **weak), restricted_pl) is not None


def test_kicks_bans_invites_and_knocks() -> None:
    # Warden's user (level 0) kicked or banned: only by someone with the power.
    warden = "@policyserv:w.org"
    assert check_event(member(MOD, warden, "ban"), auth(target="join")) is None
    assert check_event(member(EVE, warden, "ban"), auth(target="join")) is not None
    assert check_event(member(EVE, warden, "leave"), auth(target="join")) is not None
    assert check_event(member(MOD, warden, "leave"), auth(target="join")) is None
    # Not against an equal or higher level; not by someone who is not joined.
    assert check_event(member(MOD, MOD, "ban"), auth(target="join")) is not None
    assert check_event(member(MOD, warden, "ban"), auth(sender="leave")) is not None
    # Leaving: one's own, when in the room (not when banned).
    assert check_event(member(EVE, EVE, "leave"), auth(target="join")) is None
    assert check_event(member(EVE, EVE, "leave"), auth(target="ban")) is not None
    # Unban needs the ban level.
    assert check_event(member(EVE, NEW, "leave"), auth(target="ban")) is not None
    # Invites: a joined inviter with the invite level, a target neither joined nor banned.
    assert check_event(member(EVE, NEW, "invite"), auth()) is None
    assert check_event(member(EVE, NEW, "invite"), auth(target="ban")) is not None
    assert check_event(member(EVE, NEW, "invite"), auth(sender=None)) is not None
    # Knocks: only with a knock join rule (v7+).
    assert check_event(member(NEW, NEW, "knock"), auth(rule="knock", sender=None)) is None
    assert check_event(member(NEW, NEW, "knock"), auth(rule="public", sender=None)) is not None
    assert check_event(member(NEW, NEW, "knock"), auth("6", rule="knock", sender=None)) is not None
    assert check_event(member(NEW, NEW, "dance"), auth()) is not None
    assert check_event(member(MOD, "e", "join"), auth()) is not None  # not a user ID


def test_state_events_need_membership_and_power() -> None:
    rule = ev("m.policy.rule.user", EVE, {"entity": "*", "recommendation": "m.ban"}, "r")
    assert check_event(rule, auth()) is not None  # 10 < state_default 50
    assert check_event({**rule, "sender": MOD}, auth()) is None
    assert check_event({**rule, "sender": MOD}, auth(sender="leave")) is not None
    pl = {"users": {MOD: 100, EVE: 10}, "events": {"m.policy.rule.user": 10}}
    assert check_event(rule, auth(pl=pl)) is None
    # Messages need events_default; a state key naming another user is refused.
    assert check_event(ev("m.room.message", EVE, {"body": "hi"}), auth()) is None
    assert check_event(ev("m.room.message", EVE, {"body": "hi"}), auth(sender=None)) is not None
    assert check_event(ev("x.custom", MOD, {}, MOD), auth()) is None
    assert check_event(ev("x.custom", MOD, {}, EVE), auth()) is not None
    # A create event is never learned from /send.
    assert check_event(ev("m.room.create", MOD, {}, ""), auth()) is not None


def test_power_level_changes_stay_within_the_senders_level() -> None:
    base = {"users": {MOD: 100, EVE: 50}}

    def change(sender: str, content: dict[str, Any], version: str = "10") -> str | None:
        return check_event(ev("m.room.power_levels", sender, content, ""), auth(version, pl=base))

    assert change(MOD, {"users": {MOD: 100, EVE: 0}}) is None
    assert change(EVE, {"users": {MOD: 100, EVE: 100}}) is not None  # above own level
    assert change(EVE, {"users": {MOD: 0, EVE: 50}}) is not None  # a higher user's level
    assert change(EVE, {"users": {MOD: 100, EVE: 50}, "ban": 100}) is not None
    assert change(EVE, {"users": {MOD: 100, EVE: 50}, "events": {"x": 60}}) is not None
    assert change(EVE, {"users": {MOD: 100, EVE: 40}}) is None  # lowering oneself
    assert change(MOD, {"users": {MOD: 100, "e": 5}}) is not None  # not a user ID
    assert change(MOD, {"users": {MOD: "100"}}) is not None  # v10: integers only
    assert change(MOD, {"users": {MOD: "100", EVE: "50"}}, "9") is None


def test_room_version_12_creators() -> None:
    state = AuthState(
        room_version=get_room_version("12"),
        create={"room_version": "12", "additional_creators": [EVE]},
        create_sender=MOD,
        power_levels={"users": {NEW: 100}},
        join_rule="public",
        sender_membership="join",
        target_membership="join",
    )
    assert check_event(member(NEW, MOD, "ban"), state) is not None  # 100 < infinite
    assert check_event(member(EVE, NEW, "ban"), state) is None
    listed = ev("m.room.power_levels", MOD, {"users": {NEW: 100, EVE: 50}}, "")
    assert check_event(listed, state) is not None  # creators cannot be listed


def test_without_power_levels_the_creator_has_100() -> None:
    state = auth("9", pl={}, target="join")
    state = AuthState(
        room_version=state.room_version,
        create=state.create,
        create_sender=MOD,
        power_levels=None,
        join_rule="public",
        sender_membership="join",
        target_membership="join",
    )
    assert check_event(member(MOD, EVE, "ban"), state) is None
    assert check_event(member(EVE, MOD, "ban"), state) is not None

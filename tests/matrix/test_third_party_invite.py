"""``third_party_invite.signed`` checked against a room's ``m.room.third_party_invite``
as the auth rules do (the only proof of who sent an invite its sender's server did not
sign)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from warden.matrix.third_party_invite import (
    is_third_party_invite,
    third_party_invite_token,
    verify_third_party_invite,
)

INVITER = "@inviter:hs.example"
INVITEE = "@invitee:other.example"
KEY = generate_signing_key("0")
PUBLIC = encode_base64(get_verify_key(KEY).encode())
URLSAFE_PUBLIC = encode_base64(get_verify_key(KEY).encode(), urlsafe=True)


def invite_event(signed: Any, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "m.room.member",
        "sender": INVITER,
        "state_key": INVITEE,
        "content": {
            "membership": "invite",
            "third_party_invite": {"display_name": "i***", "signed": signed},
        },
    }
    event.update(overrides)
    return event


def signed_by(key: Any = KEY, **fields: Any) -> dict[str, Any]:
    return sign_json({"mxid": INVITEE, "token": "tok", **fields}, "id.example", key)


def test_recognises_third_party_invites_and_their_token() -> None:
    event = invite_event(signed_by())
    assert is_third_party_invite(event)
    assert third_party_invite_token(event) == "tok"
    plain = copy.deepcopy(event)
    del plain["content"]["third_party_invite"]
    assert not is_third_party_invite(plain)
    assert third_party_invite_token(plain) is None
    assert not is_third_party_invite(invite_event(signed_by(), type="m.room.message"))


@pytest.mark.parametrize(
    "invite",
    [
        {"public_key": PUBLIC},
        {"public_key": URLSAFE_PUBLIC},
        {"public_key": "bad", "public_keys": [{"public_key": "x"}, {"public_key": PUBLIC}]},
    ],
)
def test_a_signature_by_a_key_of_the_invite_vouches(invite: dict[str, Any]) -> None:
    assert verify_third_party_invite(invite_event(signed_by()), invite, INVITER)


@pytest.mark.parametrize(
    ("event", "invite", "invite_sender"),
    [
        # Signed by another key.
        (invite_event(signed_by(generate_signing_key("0"))), {"public_key": PUBLIC}, INVITER),
        # The invite was sent by someone else than the event's sender.
        (invite_event(signed_by()), {"public_key": PUBLIC}, "@other:hs.example"),
        # signed.mxid is not the invited user.
        (invite_event(signed_by(), state_key="@else:x"), {"public_key": PUBLIC}, INVITER),
        # Tampered after signing.
        (invite_event({**signed_by(), "mxid": "@else:x"}), {"public_key": PUBLIC}, INVITER),
        # Nothing signed, or no usable key.
        (invite_event({}), {"public_key": PUBLIC}, INVITER),
        (invite_event("signed"), {"public_key": PUBLIC}, INVITER),
        (invite_event({"mxid": INVITEE, "token": "tok"}), {"public_key": PUBLIC}, INVITER),
        (invite_event(signed_by()), {}, INVITER),
        (invite_event(signed_by()), {"public_key": 5, "public_keys": "no"}, INVITER),
        (invite_event(signed_by()), {"public_key": encode_base64(b"short")}, INVITER),
    ],
)
def test_anything_else_does_not(event: dict[str, Any], invite: Any, invite_sender: str) -> None:
    assert not verify_third_party_invite(event, invite, invite_sender)


def test_junk_signatures_do_not_break_it() -> None:
    signed = signed_by()
    signed["signatures"] = {  # junk looked at first
        "junk.example": {"ed25519:x": "!!!", "ed25519:y": 5, "other": "z"},
        "bad": "not an object",
        **signed["signatures"],
    }
    assert verify_third_party_invite(invite_event(signed), {"public_key": PUBLIC}, INVITER)

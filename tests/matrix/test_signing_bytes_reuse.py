"""verify_sender_signature with precomputed signing bytes verifies exactly those bytes."""

from __future__ import annotations

import pytest
from signedjson.key import generate_signing_key, get_verify_key

from warden.matrix.event_hashes import add_content_hash, redacted_signing_bytes
from warden.matrix.event_signing import EventSignatureError, sign_event, verify_sender_signature
from warden.matrix.room_versions import get_room_version


def test_precomputed_bytes_are_the_ones_verified() -> None:
    v = get_room_version("11")
    key = generate_signing_key("a_1")
    event = {
        "type": "m.room.message",
        "room_id": "!r:origin.test",
        "sender": "@u:origin.test",
        "content": {"body": "hi"},
        "origin_server_ts": 1,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    }
    add_content_hash(event)
    sign_event(v, event, "origin.test", key, "ed25519:a_1")
    keys = {"origin.test": {"ed25519:a_1": get_verify_key(key)}}
    good = redacted_signing_bytes(v, event)
    verify_sender_signature(v, event, keys, signing_bytes=good)  # passes
    with pytest.raises(EventSignatureError, match="does not verify"):
        verify_sender_signature(v, event, keys, signing_bytes=good + b" ")

"""Review L7: an event's far-future ``origin_server_ts`` is not passed on to the notary.

From room version 5 an event's keys must be valid at its ``origin_server_ts``, a value
its sender chooses. Warden asks the notary for keys valid until at most an hour from
now; whether the key is usable is still decided at the event's time (spec), so a
far-future event fails as before and an event within an hour asks what it always did.
Against a real local notary (HTTPS) and the test Redis and PostgreSQL.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key

from tests.federation import test_keyring
from tests.federation.test_keyring import KeyringFactory, KeyServer, notarise_with, notary_setting
from warden.federation.keyring import KeyExpired
from warden.federation.server_key_document import (
    MAX_REQUESTED_VALIDITY_AHEAD_MS,
    build_server_key_document,
    current_time_ms,
)
from warden.matrix.ids import KeyID, ServerName

YEAR_MS = 365 * 24 * 3600 * 1000

# The keyring tests' fixtures: a local key server / notary and keyrings on it.
key_server_start = test_keyring.key_server_start
key_server_keyring = test_keyring.key_server_keyring


async def notary_and_origin(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> tuple[KeyServer, Any, str, Any]:
    origin = f"remote-{uuid.uuid4().hex[:8]}.test"  # only the notary is asked
    remote = generate_signing_key("a_drft")
    notary = await key_server_start(KeyServer())
    notary.notarise = notarise_with(notary, lambda: [build_server_key_document(origin, remote)])
    keyring = key_server_keyring(direct=False, notary=notary_setting(notary))
    return notary, keyring, origin, remote


def asked_minimum(notary: KeyServer, origin: str) -> int:
    (body,) = notary.bodies
    minimum: int = body["server_keys"][origin]["ed25519:a_drft"]["minimum_valid_until_ts"]
    return minimum


async def test_far_future_event_time_is_not_sent_to_the_notary(
    key_server_start: Any,
    key_server_keyring: KeyringFactory,
) -> None:
    notary, keyring, origin, _ = await notary_and_origin(key_server_start, key_server_keyring)
    before = current_time_ms()

    with pytest.raises(KeyExpired):  # no key is valid in ten years: judged as before
        await keyring.get_verify_key(
            ServerName(origin), KeyID("ed25519:a_drft"), at_ms=before + 10 * YEAR_MS
        )

    minimum = asked_minimum(notary, origin)
    assert before <= minimum <= current_time_ms() + MAX_REQUESTED_VALIDITY_AHEAD_MS


@pytest.mark.parametrize("offset_ms", [10 * 60 * 1000, -YEAR_MS], ids=["drift", "past"])
async def test_event_times_within_the_allowance_are_asked_as_they_are(
    key_server_start: Any,
    key_server_keyring: KeyringFactory,
    offset_ms: int,
) -> None:
    notary, keyring, origin, remote = await notary_and_origin(key_server_start, key_server_keyring)
    at = current_time_ms() + offset_ms

    key = await keyring.get_verify_key(ServerName(origin), KeyID("ed25519:a_drft"), at_ms=at)

    assert bytes(key) == bytes(get_verify_key(remote))
    assert asked_minimum(notary, origin) == at

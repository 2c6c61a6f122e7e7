"""Server key documents (spec: Server-Server API, "Retrieving server keys").

``build_server_key_document`` makes the body we serve at ``/_matrix/key/v2/server``;
``verify_server_key_document`` checks one received from another server, directly or
through a notary.

Signature rule: every signature made by a key the document lists in ``verify_keys``
must verify, and there must be at least one. This is what Synapse enforces; the keyring
additionally only hands out keys the document lists. A notary's copy must also carry a
valid signature from the notary's pinned key.

Validity: the spec says a key's validity is the lesser of ``valid_until_ts`` and seven
days into the future, so that a key published once cannot be used for ever. That cap
is applied here, at verification time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from signedjson.sign import SignatureVerifyException, sign_json, verify_signed_json

from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import (
    POLICY_SERVER_KEY_ID,
    SigningKey,
    VerifyKey,
    decode_verify_key,
    key_id_of,
    verify_key_base64,
)

DAY_MS = 24 * 60 * 60 * 1000
DEFAULT_VALID_FOR_MS = DAY_MS
MAX_KEY_VALIDITY_MS = 7 * DAY_MS  # spec: use the lesser of valid_until_ts and now + 7 days
# How far ahead of now we ask a notary for keys to stay valid (review L7). From room
# version 5 an event's keys must be valid at its origin_server_ts, which its sender
# chooses: asked as is, a far-future value makes the notary refetch the server's keys on
# every such event. One hour covers ordinary clock drift.
MAX_REQUESTED_VALIDITY_AHEAD_MS = 3600 * 1000

JsonDict = dict[str, Any]


class InvalidKeyDocument(ValueError):
    """A server key document is malformed, for another server, or badly signed."""


@dataclass(frozen=True, slots=True)
class FetchedKey:
    """One verify key taken from a verified server key document.

    ``valid_until_ts`` is already capped at seven days after verification; for a key
    from ``old_verify_keys`` it is the key's ``expired_ts`` and ``expired`` is true.
    """

    server_name: ServerName
    key_id: KeyID
    verify_key: VerifyKey
    key_base64: str
    valid_until_ts: int
    expired: bool


def current_time_ms() -> int:
    """The current time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def requested_validity_ts(at_ms: int, now_ms: int) -> int:
    """The ``minimum_valid_until_ts`` to ask a notary for when a key must be valid at
    ``at_ms``: that time, but never more than an hour past ``now_ms``.

    Only the request is clamped: whether the key is usable is still decided at
    ``at_ms``, so events are judged as the spec says, and an event within an hour of
    the present asks exactly what it asked before.
    """
    return min(at_ms, now_ms + MAX_REQUESTED_VALIDITY_AHEAD_MS)


def build_server_key_document(
    server_name: str,
    signing_key: SigningKey,
    *,
    valid_for_ms: int = DEFAULT_VALID_FOR_MS,
    old_verify_keys: Mapping[KeyID, tuple[VerifyKey, int]] | None = None,
    now_ms: int | None = None,
) -> JsonDict:
    """Build and self-sign our ``/_matrix/key/v2/server`` response.

    ``signing_key`` must be the federation key; the policy key (``ed25519:policy_server``)
    is refused because it must never be published as a server key. ``old_verify_keys``
    maps retired key IDs to their public key and ``expired_ts``.
    """
    key_id = key_id_of(signing_key)
    if key_id == POLICY_SERVER_KEY_ID:
        raise ValueError("the policy key must not be published as a server key")
    if valid_for_ms <= 0:
        raise ValueError("valid_for_ms must be positive")
    now = current_time_ms() if now_ms is None else now_ms
    doc: JsonDict = {
        "server_name": server_name,
        "valid_until_ts": now + valid_for_ms,
        "verify_keys": {key_id: {"key": verify_key_base64(signing_key)}},
        "old_verify_keys": {
            old_id: {"key": verify_key_base64(old_key), "expired_ts": expired_ts}
            for old_id, (old_key, expired_ts) in (old_verify_keys or {}).items()
        },
    }
    signed: JsonDict = sign_json(doc, server_name, cast(Any, signing_key))
    return signed


def _is_int(value: Any) -> bool:
    return type(value) is int


def _parse_keys(
    section: Any, name: str, *, old: bool
) -> dict[KeyID, tuple[str, VerifyKey, int | None]]:
    if section is None and old:
        return {}
    if not isinstance(section, dict):
        raise InvalidKeyDocument(f"{name} is not an object")
    keys: dict[KeyID, tuple[str, VerifyKey, int | None]] = {}
    for key_id, entry in section.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise InvalidKeyDocument(f"{name}[{key_id!r}] has no 'key' string")
        expired_ts: int | None = None
        if old:
            expired_ts = entry.get("expired_ts")
            if not _is_int(expired_ts):
                raise InvalidKeyDocument(f"{name}[{key_id!r}] has no integer 'expired_ts'")
        if not key_id.startswith("ed25519:") or len(key_id) == len("ed25519:"):
            continue  # an algorithm we do not speak: not an error, just unusable
        try:
            verify_key = decode_verify_key(key_id, entry["key"])
        except ValueError as exc:
            raise InvalidKeyDocument(f"{name}[{key_id!r}]: {exc}") from None
        keys[KeyID(key_id)] = (entry["key"], verify_key, expired_ts)
    return keys


def verify_server_key_document(
    doc: Any,
    expected_server_name: str,
    *,
    now_ms: int,
    notary: tuple[ServerName, KeyID, VerifyKey] | None = None,
) -> dict[KeyID, FetchedKey]:
    """Check a server key document and return the keys it vouches for.

    Checks that ``server_name`` is the one asked for, that ``valid_until_ts`` is an
    integer, that it is self-signed as described in the module docstring, and, when
    ``notary`` is given (name, key ID, pinned key), that the notary signed it too.
    Raises ``InvalidKeyDocument``.
    """
    if not isinstance(doc, dict):
        raise InvalidKeyDocument("key document is not an object")
    server_name = doc.get("server_name")
    if server_name != expected_server_name:
        raise InvalidKeyDocument(
            f"key document is for {server_name!r}, not {expected_server_name!r}"
        )
    valid_until = doc.get("valid_until_ts")
    if not isinstance(valid_until, int) or isinstance(valid_until, bool):
        raise InvalidKeyDocument("valid_until_ts is missing or not an integer")
    current = _parse_keys(doc.get("verify_keys"), "verify_keys", old=False)
    old = _parse_keys(doc.get("old_verify_keys"), "old_verify_keys", old=True)
    signatures = doc.get("signatures")
    if not isinstance(signatures, dict):
        raise InvalidKeyDocument("key document is not signed")
    own = signatures.get(server_name)
    if not isinstance(own, dict):
        raise InvalidKeyDocument(f"key document has no signature from {server_name}")

    self_signed = False
    for key_id in own:
        entry = current.get(KeyID(key_id))
        if entry is None:
            # A signature by a key not listed (e.g. an old key) proves nothing here.
            continue
        try:
            verify_signed_json(doc, server_name, cast(Any, entry[1]))
        except SignatureVerifyException:
            raise InvalidKeyDocument(
                f"key document's signature by {key_id} does not verify"
            ) from None
        self_signed = True
    if not self_signed:
        raise InvalidKeyDocument(
            f"key document is not signed by any of {server_name}'s verify_keys"
        )

    if notary is not None:
        notary_name, notary_key_id, notary_key = notary
        notary_sigs = signatures.get(notary_name)
        if not isinstance(notary_sigs, dict) or notary_key_id not in notary_sigs:
            raise InvalidKeyDocument(
                f"key document is not signed by the notary's pinned key {notary_key_id}"
            )
        try:
            verify_signed_json(doc, notary_name, cast(Any, _with_key_id(notary_key, notary_key_id)))
        except SignatureVerifyException:
            raise InvalidKeyDocument(
                f"the notary's signature by {notary_key_id} does not verify"
            ) from None

    capped = min(valid_until, now_ms + MAX_KEY_VALIDITY_MS)
    name = ServerName(server_name)
    result: dict[KeyID, FetchedKey] = {}
    for key_id, (b64, verify_key, expired_ts) in old.items():
        assert expired_ts is not None
        result[key_id] = FetchedKey(name, key_id, verify_key, b64, expired_ts, True)
    # A key listed as current wins over the same ID listed as old.
    for key_id, (b64, verify_key, _) in current.items():
        result[key_id] = FetchedKey(name, key_id, verify_key, b64, capped, False)
    return result


def _with_key_id(key: VerifyKey, key_id: KeyID) -> VerifyKey:
    """Make sure ``key`` carries the ``alg``/``version`` signedjson looks signatures up by."""
    alg, _, version = key_id.partition(":")
    tagged: Any = key  # nacl's VerifyKey does not declare these attributes
    tagged.alg = alg
    tagged.version = version
    return key

"""Signing events and checking their signatures.

Spec: Server-Server API, "Signing events" and "Validating hashes and signatures on
received events". A server signs the canonical JSON of the *redacted* event without
``signatures`` and ``unsigned``, so a signature survives redaction. A policy server
answers ``/sign`` with exactly such a signature under ``ed25519:policy_server``.

This is the ``/sign`` hot path: the event is redacted once (a shallow copy), encoded
once, and signed with PyNaCl directly rather than through ``signedjson.sign_json``,
which would deep-copy and re-encode.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import nacl.exceptions
import nacl.signing
from unpaddedbase64 import encode_base64

from warden.matrix.event_hashes import redacted_signing_bytes
from warden.matrix.ids import ServerName
from warden.matrix.room_versions import EventFormat, RoomVersion

__all__ = [
    "EventSignatureError",
    "EventSigningKey",
    "EventVerifyKey",
    "compute_event_signature",
    "servers_required_to_sign",
    "sign_event",
    "verify_event_signature",
    "verify_sender_signature",
]


class EventSigningKey(Protocol):
    """An ed25519 signing key: ``nacl.signing.SigningKey`` or signedjson's key type."""

    def sign(self, message: bytes, /) -> nacl.signing.SignedMessage: ...


class EventVerifyKey(Protocol):
    """An ed25519 public key: ``nacl.signing.VerifyKey`` or signedjson's key type."""

    def verify(self, message: bytes, signature: bytes, /) -> bytes: ...


class EventSignatureError(ValueError):
    """An event lacks a signature it needs, or a signature does not verify."""


def _server_of(user_or_event_id: object, what: str) -> ServerName:
    if not isinstance(user_or_event_id, str):
        raise EventSignatureError(f"{what} is not a string")
    _, sep, server = user_or_event_id.partition(":")
    if not sep or not server:
        raise EventSignatureError(f"{what} {user_or_event_id!r} has no server part")
    return ServerName(server)


def _decode_signature(signature: str) -> bytes:
    # Signatures are unpadded standard base64; accept padding and the URL-safe
    # alphabet too, as Synapse does (unpaddedbase64.decode_base64).
    padded = signature + "=" * (-len(signature) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def _sign_bytes(message: bytes, signing_key: EventSigningKey) -> str:
    return encode_base64(signing_key.sign(message).signature)


def compute_event_signature(
    room_version: RoomVersion,
    event: Mapping[str, Any],
    server_name: str,
    signing_key: EventSigningKey,
    key_id: str,
) -> dict[str, dict[str, str]]:
    """Sign ``event`` as ``server_name`` with ``key_id``; return ``{server: {key_id: sig}}``.

    The event is not modified. Raises ``CanonicalJSONError`` if it is not canonical JSON.
    """
    message = redacted_signing_bytes(room_version, event)
    return {server_name: {key_id: _sign_bytes(message, signing_key)}}


def sign_event(
    room_version: RoomVersion,
    event: dict[str, Any],
    server_name: str,
    signing_key: EventSigningKey,
    key_id: str,
) -> dict[str, dict[str, str]]:
    """Add ``server_name``'s signature with ``key_id`` to ``event["signatures"]``.

    Other signatures (other servers, or other keys of the same server) are kept.
    Returns the new signature in the ``compute_event_signature`` shape.
    """
    signature = compute_event_signature(room_version, event, server_name, signing_key, key_id)
    signatures = event.get("signatures")
    if not isinstance(signatures, dict):
        signatures = event["signatures"] = {}
    by_server = signatures.get(server_name)
    if not isinstance(by_server, dict):
        by_server = signatures[server_name] = {}
    by_server.update(signature[server_name])
    return signature


def _verify_bytes(message: bytes, signature: object, verify_key: EventVerifyKey) -> bool:
    if not isinstance(signature, str):
        return False
    try:
        raw = _decode_signature(signature)
        verify_key.verify(message, raw)
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
        # ValueError covers non-ASCII text and wrong-length signatures.
        return False
    return True


def _signature_of(event: Mapping[str, Any], server_name: str, key_id: str) -> object:
    signatures = event.get("signatures")
    if not isinstance(signatures, Mapping):
        return None
    by_server = signatures.get(server_name)
    if not isinstance(by_server, Mapping):
        return None
    return by_server.get(key_id)


def verify_event_signature(
    room_version: RoomVersion,
    event: Mapping[str, Any],
    server_name: str,
    key_id: str,
    verify_key: EventVerifyKey,
) -> bool:
    """Whether ``event`` carries a valid signature by ``server_name`` under ``key_id``.

    False when the signature is missing, malformed or wrong; also False when the event
    cannot be encoded as canonical JSON (it could not have been signed validly).
    """
    signature = _signature_of(event, server_name, key_id)
    if signature is None:
        return False
    try:
        message = redacted_signing_bytes(room_version, event)
    except ValueError:
        return False
    return _verify_bytes(message, signature, verify_key)


def servers_required_to_sign(
    room_version: RoomVersion, event: Mapping[str, Any]
) -> frozenset[ServerName]:
    """The servers whose signatures ``event`` needs (spec: "Validating hashes and
    signatures on received events"; Synapse ``_check_sigs_on_pdu``).

    * the sender's server, except for invites made from a third-party invite;
    * room versions 1 and 2: the server that minted the ``event_id``;
    * joins with ``join_authorised_via_users_server`` (v8+): that user's server.

    Raises ``EventSignatureError`` if an ID needed here is missing or malformed.
    """
    servers: set[ServerName] = set()
    content = event.get("content")
    if not isinstance(content, Mapping):
        content = {}
    is_member = event.get("type") == "m.room.member"
    membership = content.get("membership")
    if not (is_member and membership == "invite" and "third_party_invite" in content):
        servers.add(_server_of(event.get("sender"), "sender"))
    if room_version.event_format is EventFormat.V1_V2:
        servers.add(_server_of(event.get("event_id"), "event_id"))
    if (
        room_version.restricted_join_rule
        and is_member
        and membership == "join"
        and "join_authorised_via_users_server" in content
    ):
        servers.add(
            _server_of(
                content["join_authorised_via_users_server"],
                "content.join_authorised_via_users_server",
            )
        )
    return frozenset(servers)


def verify_sender_signature(
    room_version: RoomVersion,
    event: Mapping[str, Any],
    verify_keys: Mapping[str, Mapping[str, EventVerifyKey]],
    *,
    servers: Iterable[str] | None = None,
    signing_bytes: bytes | None = None,
) -> None:
    """Check that every server required to sign ``event`` has signed it validly.

    ``verify_keys`` maps server name to ``{key_id: verify_key}`` (the caller fetches
    them, e.g. from the key notary). For each server, every ``ed25519`` signature made
    with a key we hold must verify, and there must be at least one such signature
    (as in Synapse's keyring). ``servers`` overrides ``servers_required_to_sign``;
    ``signing_bytes`` are ``redacted_signing_bytes(room_version, event)`` when the
    caller has already computed them (the /sign path has), sparing a second redaction.

    Raises ``EventSignatureError`` naming the server that failed.
    """
    required = servers_required_to_sign(room_version, event) if servers is None else servers
    signatures = event.get("signatures")
    if not isinstance(signatures, Mapping):
        raise EventSignatureError("event has no 'signatures' object")
    message = signing_bytes
    for server in sorted(required):
        by_server = signatures.get(server)
        if not isinstance(by_server, Mapping):
            raise EventSignatureError(f"event is not signed by {server}")
        keys = verify_keys.get(server, {})
        checked = 0
        for key_id, signature in by_server.items():
            if not (isinstance(key_id, str) and key_id.startswith("ed25519:")):
                continue
            verify_key = keys.get(key_id)
            if verify_key is None:
                continue
            if message is None:
                try:
                    message = redacted_signing_bytes(room_version, event)
                except ValueError as exc:
                    raise EventSignatureError(f"event is not canonical JSON: {exc}") from exc
            if not _verify_bytes(message, signature, verify_key):
                raise EventSignatureError(f"signature by {server} with {key_id} does not verify")
            checked += 1
        if not checked:
            raise EventSignatureError(f"no signature by {server} with a known key")

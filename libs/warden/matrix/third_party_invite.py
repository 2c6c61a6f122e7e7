"""Third-party invites: the one membership event whose sender's server need not sign it.

An ``m.room.member`` invite made from a third-party invite (``content.third_party_invite``,
spec: Server-Server API "Inviting to a room" / ``exchange_third_party_invite``) is
exempt from the sender's server's signature. Instead, the room's auth rules check that
``content.third_party_invite.signed`` (``mxid``, ``token`` and ``signatures``) is signed
by one of the public keys of the room's ``m.room.third_party_invite`` state event whose
state key is the token, and that this state event has the same sender. That is the only
proof such an event gives of who sent it; ``verify_third_party_invite`` checks it the
way Synapse does (``_verify_third_party_invite``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import nacl.exceptions
import nacl.signing

from warden.matrix.canonical_json import encode_canonical_json

__all__ = [
    "THIRD_PARTY_INVITE",
    "is_third_party_invite",
    "third_party_invite_token",
    "verify_third_party_invite",
]

THIRD_PARTY_INVITE = "m.room.third_party_invite"

# Bounds on the work one event can ask for: signatures in ``signed`` looked at, and
# public keys of the invite tried against each.
MAX_SIGNATURES = 8
MAX_PUBLIC_KEYS = 8


def is_third_party_invite(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` is an invite made from a third-party invite."""
    content = event.get("content")
    return (
        event.get("type") == "m.room.member"
        and isinstance(content, Mapping)
        and content.get("membership") == "invite"
        and "third_party_invite" in content
    )


def _signed(event: Mapping[str, Any]) -> Mapping[str, Any] | None:
    content = event.get("content")
    tpi = content.get("third_party_invite") if isinstance(content, Mapping) else None
    signed = tpi.get("signed") if isinstance(tpi, Mapping) else None
    return signed if isinstance(signed, Mapping) else None


def third_party_invite_token(event: Mapping[str, Any]) -> str | None:
    """``content.third_party_invite.signed.token``: the state key of the room's
    ``m.room.third_party_invite`` it claims to come from (None when absent)."""
    signed = _signed(event)
    token = signed.get("token") if signed is not None else None
    return token if isinstance(token, str) and token else None


def _b64decode(text: str) -> bytes:
    # Unpadded standard base64, padded and URL-safe accepted (as Synapse does).
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def _public_keys(invite_content: Mapping[str, Any]) -> list[nacl.signing.VerifyKey]:
    """The invite's keys: ``public_key`` and each ``public_keys[].public_key``."""
    raw: list[object] = [invite_content.get("public_key")]
    listed = invite_content.get("public_keys")
    if isinstance(listed, list):
        raw.extend(k.get("public_key") for k in listed if isinstance(k, Mapping))
    keys = []
    for text in raw:
        if not isinstance(text, str):
            continue
        try:
            keys.append(nacl.signing.VerifyKey(_b64decode(text)))
        except (binascii.Error, ValueError, TypeError, nacl.exceptions.CryptoError):
            continue
        if len(keys) >= MAX_PUBLIC_KEYS:
            break
    return keys


def verify_third_party_invite(
    event: Mapping[str, Any], invite_content: Mapping[str, Any], invite_sender: str
) -> bool:
    """Whether the room's ``m.room.third_party_invite`` (its content and sender, as
    learned) vouches for ``event``: ``signed.mxid`` is the event's state key, the invite
    was sent by the event's sender, and some signature in ``signed`` verifies with one of
    the invite's public keys. Never raises."""
    signed = _signed(event)
    if signed is None:
        return False
    mxid, token = signed.get("mxid"), signed.get("token")
    if not isinstance(mxid, str) or not isinstance(token, str):
        return False
    if mxid != event.get("state_key") or invite_sender != event.get("sender"):
        return False
    signatures = signed.get("signatures")
    if not isinstance(signatures, Mapping):
        return False
    keys = _public_keys(invite_content)
    if not keys:
        return False
    try:
        message = encode_canonical_json(
            {k: v for k, v in signed.items() if k != "signatures" and k != "unsigned"}
        )
    except ValueError:
        return False
    tried = 0
    for by_server in signatures.values():
        if not isinstance(by_server, Mapping):
            continue
        for key_id, signature in by_server.items():
            if not (isinstance(key_id, str) and key_id.startswith("ed25519:")):
                continue
            if not isinstance(signature, str) or tried >= MAX_SIGNATURES:
                continue
            tried += 1
            try:
                raw = _b64decode(signature)
            except (binascii.Error, ValueError):
                continue
            for key in keys:
                try:
                    key.verify(message, raw)
                except (ValueError, nacl.exceptions.CryptoError):
                    continue
                return True
    return False

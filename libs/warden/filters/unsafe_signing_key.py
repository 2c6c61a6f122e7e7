"""Unsafe signing key filter: an event signed with the publicly known compromised key.

policyserv's ``UnsafeSigningKeyFilter`` (ELEMENTSEC-2025-1670): the ed25519 key that Go's
``ed25519.GenerateKey`` makes from ``math/rand`` seed 0 was used by some servers, and its
private half is public, so anything signed with it proves nothing. policyserv re-signs the
redacted event with that key and compares the bytes with the event's signatures; ed25519
signatures are deterministic, so checking each signature against the key's public half
(``warden.federation.keyring.COMPROMISED_KEYS``) finds the same ones without holding the
private key.

Only the sender's server's signatures are checked (``FilterContext.sender_signatures``):
the keyring already refuses the key, so an event signed *only* with it fails
verification; this filter catches one that carries it next to a valid signature. Note
that no hash covers signatures, so whoever relays an event can add such a signature; the
refusal then is the one policyserv would give.

``unsafe_signing_key_filter_enabled`` (default true) can be stored as ``false`` by a
community, unlike in policyserv (where a stored ``false`` is dropped).
"""

from __future__ import annotations

import binascii

import nacl.exceptions
import nacl.signing
from unpaddedbase64 import decode_base64

from warden.federation.keyring import COMPROMISED_KEYS
from warden.filters.base import Filter, FilterContext, FilterResult, Group
from warden.matrix.event_hashes import redacted_signing_bytes
from warden.matrix.room_versions import KNOWN_ROOM_VERSIONS
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import OTHER

(ENABLED,) = declare(
    ConfigKey(
        "unsafe_signing_key_filter_enabled",
        "bool",
        True,
        "Refuse events whose sender's server signed them with the publicly known "
        "compromised ed25519 key (ELEMENTSEC-2025-1670).",
    ),
)

_BAD_KEYS = tuple(nacl.signing.VerifyKey(k) for k in sorted(COMPROMISED_KEYS))

# As many signatures per server as the gateway looks at; more were refused there.
MAX_SIGNATURES = 8


def signed_with_unsafe_key(message: bytes, signature: object) -> bool:
    """Whether ``signature`` (unpadded base64) is a valid signature of ``message`` by a
    compromised key."""
    if not isinstance(signature, str):
        return False
    try:
        raw = decode_base64(signature)
    except (binascii.Error, ValueError):
        return False
    for key in _BAD_KEYS:
        try:
            key.verify(message, raw)
        except (nacl.exceptions.BadSignatureError, ValueError):
            continue
        return True
    return False


class UnsafeSigningKeyFilter(Filter):
    """Prohibits (``other``) events signed by the sender's server with a compromised key."""

    name = "unsafe_signing_key"
    group = Group.PREFILTER
    harm_ids = (OTHER,)
    waits_on_io = False

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while ``unsafe_signing_key_filter_enabled`` is true."""
        return config.get_bool(ENABLED.name)

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when any of the sender's server's signatures verifies under a
        compromised key."""
        signatures = list(ctx.sender_signatures.values())[:MAX_SIGNATURES]
        if not signatures:
            return FilterResult.neutral()
        version = KNOWN_ROOM_VERSIONS.get(ctx.room_version)
        if version is None:
            return FilterResult.neutral()
        try:
            message = redacted_signing_bytes(version, ctx.event)
        except ValueError:  # not canonical JSON: no valid signature can cover it
            return FilterResult.neutral()
        if any(signed_with_unsafe_key(message, s) for s in signatures):
            return FilterResult.prohibited(OTHER)
        return FilterResult.neutral()

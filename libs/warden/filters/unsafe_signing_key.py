"""Unsafe signing key filter: an event signed with the publicly known compromised key.

policyserv's ``UnsafeSigningKeyFilter`` (ELEMENTSEC-2025-1670): the ed25519 key that Go's
``ed25519.GenerateKey`` makes from ``math/rand`` seed 0 was used by some servers, and its
private half is public, so anything signed with it proves nothing. policyserv re-signs the
redacted event with that key and compares the bytes with the event's signatures, and so
does this filter (ed25519 signatures are deterministic, and libsodium accepts no other
encoding of a valid one).

Only the sender's server's signatures are checked (``FilterContext.sender_signatures``),
and a bad-key signature counts only under a key ID that the server's own key document
gives the compromised key: the keyring marks those when it fetches the document
(``redis_keys.unsafe_signing_key``) and drops the key, so an event signed *only* with it
fails verification at the gateway. No hash covers signatures and the key's private half
is public, so anyone relaying an event could add such a signature under a made-up key
ID; counting that would let whoever asks first get someone else's event refused and its
sender hellbanned. What trips this filter is therefore a server that itself uses the
compromised key, next to a valid key (policyserv checks every signature of every server).

So an event whose sender's server signed it once, asked about through ``/sign`` or
``/check`` (whose signatures the gateway verified: that one signature is valid under a key
the keyring holds, and it never holds the compromised one), cannot trip it; the filter
then spends nothing (``FilterContext.sender_signatures_checked``). Re-signing costs about
as much as the rest of the pipeline together, and nearly every event carries one signature.

``unsafe_signing_key_filter_enabled`` (default true) can be stored as ``false`` by a
community, unlike in policyserv (where a stored ``false`` is dropped).
"""

from __future__ import annotations

import binascii

import nacl.signing
from unpaddedbase64 import decode_base64

from warden import redis_keys
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

# The compromised key's private seed: the first 32 bytes Go's math/rand seed 0 gives (the
# whole point is that it is public). ed25519 signatures are deterministic, so signing the
# event with it once and comparing bytes finds its signatures, for a third of the cost of
# verifying each one (as policyserv does).
_BAD_SEED = bytes.fromhex("0194fdc2fa2ffcc041d3ff12045b73c86e4ff95ff662a5eee82abdf44a2d0b75")
_BAD_KEY = nacl.signing.SigningKey(_BAD_SEED)
if bytes(_BAD_KEY.verify_key) not in COMPROMISED_KEYS:  # the keyring drops the same key
    raise RuntimeError("the unsafe signing key filter's key is not the keyring's")

# As many signatures per server as the gateway looks at; more were refused there.
MAX_SIGNATURES = 8


def unsafe_signature(message: bytes) -> bytes:
    """The compromised key's signature of ``message`` (the redacted signing bytes)."""
    return _BAD_KEY.sign(message).signature


def decoded_signature(signature: object) -> bytes | None:
    """A signature's raw bytes (unpadded base64, padding tolerated), or None."""
    if not isinstance(signature, str):
        return None
    try:
        return decode_base64(signature)
    except (binascii.Error, ValueError):
        return None


class UnsafeSigningKeyFilter(Filter):
    """Prohibits (``other``) events signed by the sender's server with a compromised key
    that the server itself publishes."""

    name = "unsafe_signing_key"
    group = Group.PREFILTER
    harm_ids = (OTHER,)
    # Redis is read only for an event carrying a compromised-key signature (rare), and
    # only an event with more than one signature of its sender's server can.
    waits_on_io = False
    waits_on_io_sometimes = True

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while ``unsafe_signing_key_filter_enabled`` is true."""
        return config.get_bool(ENABLED.name)

    def waits_for(self, ctx: FilterContext) -> bool:
        """Only an event that could carry a compromised-key signature may need Redis."""
        return _could_carry_one(ctx)

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited when a signature of the sender's server verifies under a
        compromised key, under a key ID that server publishes for that key."""
        if not _could_carry_one(ctx):
            return FilterResult.neutral()
        signatures = list(ctx.sender_signatures.items())[:MAX_SIGNATURES]
        version = KNOWN_ROOM_VERSIONS.get(ctx.room_version)
        if version is None:
            return FilterResult.neutral()
        try:
            message = redacted_signing_bytes(version, ctx.event)
        except ValueError:  # not canonical JSON: no valid signature can cover it
            return FilterResult.neutral()
        bad = unsafe_signature(message)
        server = ctx.sender.partition(":")[2]
        marks = [
            redis_keys.unsafe_signing_key(server, key_id)
            for key_id, signature in signatures
            if isinstance(key_id, str) and decoded_signature(signature) == bad
        ]
        if marks and int(await ctx.deps.auto_pipeline.execute_command("EXISTS", *marks)) > 0:
            return FilterResult.prohibited(OTHER)
        return FilterResult.neutral()


def _could_carry_one(ctx: FilterContext) -> bool:
    """False when no signature of the sender's server can be a compromised key's: there
    is none, or the gateway verified the only one (see the module docstring)."""
    count = len(ctx.sender_signatures)
    return count > 1 or (count == 1 and not ctx.sender_signatures_checked)

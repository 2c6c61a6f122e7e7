"""Signing keys in Synapse's key-file format (``ed25519 <version> <unpadded base64 seed>``).

Warden has two keys: the federation key, published at ``/_matrix/key/v2/server`` and
used for X-Matrix requests; and the policy key, which signs events as
``ed25519:policy_server`` and is never published as a server key (MSC4284).
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import cast

from signedjson.key import (
    decode_verify_key_bytes,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.types import SigningKey as SigningKey
from signedjson.types import VerifyKey as VerifyKey
from unpaddedbase64 import decode_base64

from warden.matrix.ids import KeyID

POLICY_SERVER_KEY_ID = KeyID("ed25519:policy_server")


class KeyFileError(Exception):
    """A key file is missing, unreadable or malformed."""


def key_id_of(key: SigningKey) -> KeyID:
    """``ed25519:<version>`` for a key read by signedjson (which sets ``alg``/``version``)."""
    return KeyID(f"{key.alg}:{key.version}")


def verify_key_base64(key: SigningKey | VerifyKey) -> str:
    """The unpadded base64 public key."""
    # A signing key carries its public half; a verify key is used as it is.
    verify = cast(VerifyKey, getattr(key, "verify_key", key))
    return str(encode_verify_key_base64(verify))


def decode_verify_key(key_id: str, key_base64: str) -> VerifyKey:
    """Decode an unpadded base64 ed25519 public key. Raises ``ValueError``."""
    try:
        raw = decode_base64(key_base64)
        key: VerifyKey = decode_verify_key_bytes(key_id, raw)
    except Exception as exc:  # binascii.Error, nacl errors, bad algorithm
        raise ValueError(f"not a valid {key_id} public key") from exc
    return key


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read the first key of a Synapse-format key file."""
    try:
        with open(path, encoding="utf-8") as f:
            keys = read_signing_keys(f)
    except FileNotFoundError:
        raise KeyFileError(f"key file {os.fspath(path)!r} does not exist") from None
    except Exception as exc:
        raise KeyFileError(f"key file {os.fspath(path)!r} is malformed: {exc}") from None
    if not keys:
        raise KeyFileError(f"key file {os.fspath(path)!r} holds no key")
    key: SigningKey = keys[0]
    return key


def random_key_version() -> str:
    """A version like Synapse's: ``a_`` and four random letters or digits."""
    alphabet = string.ascii_letters + string.digits
    return "a_" + "".join(secrets.choice(alphabet) for _ in range(4))


def write_new_key(path: str | os.PathLike[str], version: str | None = None) -> SigningKey:
    """Generate a key and write it to ``path`` (mode 0600). Refuses to overwrite."""
    key = generate_signing_key(version or random_key_version())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        write_signing_keys(f, [key])
    return key


def ensure_key(path: str | os.PathLike[str]) -> tuple[SigningKey, bool]:
    """Load the key at ``path``, generating it first if the file is missing.

    Returns the key and whether it was created.
    """
    if Path(path).exists():
        return load_signing_key(path), False
    return write_new_key(path), True


def check_distinct(federation_key: SigningKey, policy_key: SigningKey) -> None:
    """Refuse the same key in both roles: the policy key must never be published."""
    if bytes(get_verify_key(federation_key)) == bytes(get_verify_key(policy_key)):
        raise KeyFileError(
            "the federation key (PS_HOMESERVER_SIGNING_KEY_PATH) and the policy key "
            "(PS_HOMESERVER_EVENT_SIGNING_KEY_PATH) are the same key; generate a "
            "separate policy key with 'warden keygen'"
        )

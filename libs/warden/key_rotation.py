"""``warden keygen --rotate federation|policy``: replace a signing key file.

The new key is written beside the old file and moved into place, so the path never holds
a partial key; the old file is kept as ``<path>.<old version>.retired`` (for a rollback;
delete it once the rotation is done). What the operator must do next differs by key, see
docs/operator-guide.md, "Keys":

- federation key: publish the old public key in ``PS_OLD_VERIFY_KEYS`` (the command prints
  the whole new value: the current setting plus the retired key);
- policy key: every protected room must send a new ``m.room.policy`` with the new public
  key. A room names exactly one ``ed25519`` key, always ``ed25519:policy_server``, so there
  is no period in which both keys are accepted.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from signedjson.key import generate_signing_key, write_signing_keys

from warden.matrix.keys import (
    KeyFileError,
    SigningKey,
    key_id_of,
    load_signing_key,
    random_key_version,
    verify_key_base64,
)
from warden.settings import parse_old_verify_keys


@dataclass(frozen=True)
class Rotation:
    """The outcome of one rotation."""

    old_key: SigningKey
    new_key: SigningKey
    retired_path: Path  # where the old key file now is


def rotate_key_file(path: str | os.PathLike[str], *, avoid_versions: set[str]) -> Rotation:
    """Replace the key at ``path`` with a new one (a version not in ``avoid_versions``).

    Raises ``KeyFileError`` when there is no key to rotate or the retired copy exists.
    """
    p = Path(path)
    old = load_signing_key(p)
    avoid = {*avoid_versions, old.version}
    version = random_key_version()
    while version in avoid:
        version = random_key_version()
    new = generate_signing_key(version)
    retired = p.with_name(f"{p.name}.{old.version}.retired")
    tmp = p.with_name(f".{p.name}.{version}.new")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:  # e.g. a read-only Secret volume: rotate a copy instead
        raise KeyFileError(f"cannot write a new key beside {p}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        write_signing_keys(f, [new])
        f.flush()
        os.fsync(f.fileno())
    try:
        # A hard link keeps the old key (and its mode) under the retired name; it fails
        # rather than overwrite an earlier retired copy.
        os.link(p, retired)
    except FileExistsError:
        tmp.unlink()
        raise KeyFileError(f"{retired} already exists; move it away first") from None
    except OSError as exc:
        tmp.unlink()
        raise KeyFileError(f"cannot keep the old key as {retired}: {exc.strerror}") from None
    os.replace(tmp, p)
    return Rotation(old, new, retired)


def old_verify_keys_entry(key: SigningKey, expired_ts_ms: int) -> str:
    """The ``PS_OLD_VERIFY_KEYS`` entry that publishes ``key`` as retired."""
    return f"{key_id_of(key)}={verify_key_base64(key)}@{expired_ts_ms}"


def rotate_federation_key(
    path: str | os.PathLike[str], current_old_verify_keys: str, now_ms: int | None = None
) -> tuple[Rotation, str]:
    """Rotate the federation key; return it and the new ``PS_OLD_VERIFY_KEYS`` value."""
    listed = parse_old_verify_keys(current_old_verify_keys)
    # A reused key ID would make others' caches confuse the old and the new key.
    used = {k.key_id.partition(":")[2] for k in listed}
    rotation = rotate_key_file(path, avoid_versions=used)
    expired = int(time.time() * 1000) if now_ms is None else now_ms
    entry = old_verify_keys_entry(rotation.old_key, expired)
    kept = [
        f"{k.key_id}={k.verify_key_base64}@{k.expired_ts}"
        for k in listed
        if k.key_id != key_id_of(rotation.old_key)
    ]
    value = ",".join([*kept, entry])
    parse_old_verify_keys(value)  # what the services will accept
    return rotation, value


def print_rotation(which: str, federation_path: str, policy_path: str, old_keys: str) -> int:
    """``warden keygen --rotate``: rotate one key and print the next steps; exit status."""
    try:
        if which == "federation":
            rotation, value = rotate_federation_key(federation_path, old_keys)
            path = federation_path
        else:
            rotation = rotate_key_file(policy_path, avoid_versions=set())
            path = policy_path
    except (KeyFileError, ValueError) as exc:
        # ValueError: the current PS_OLD_VERIFY_KEYS is malformed (checked before writing).
        print(f"warden keygen: {exc}", file=sys.stderr)
        return 1
    new, old = rotation.new_key, rotation.old_key
    print(f"{which} key: {path} (rotated) {key_id_of(new)} {verify_key_base64(new)}")
    print(f"old {which} key: {rotation.retired_path} {key_id_of(old)} {verify_key_base64(old)}")
    if which == "federation":
        print(
            "Set this and restart every gateway and filter worker now "
            "(the timestamp is this rotation's):"
        )
        print(f"PS_OLD_VERIFY_KEYS={value}")
    else:
        print(
            "Restart every gateway, then update every protected room's m.room.policy to "
            f'"public_keys": {{"ed25519": "{verify_key_base64(new)}"}}; until a room is '
            "updated, servers refuse or soft-fail the events Warden signs for it."
        )
    print(f"Delete {rotation.retired_path} once the rotation is complete.")
    return 0

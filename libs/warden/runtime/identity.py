"""Our server's identity: its name and its two signing keys."""

from __future__ import annotations

from dataclasses import dataclass

from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import (
    SigningKey,
    check_distinct,
    key_id_of,
    load_signing_key,
    verify_key_base64,
)
from warden.settings import Settings


@dataclass(frozen=True)
class Identity:
    """The federation key signs requests and our key document; the policy key signs
    events as ``ed25519:policy_server`` and is published only through
    ``/.well-known/matrix/policy_server``."""

    server_name: ServerName
    federation_key: SigningKey
    federation_key_id: KeyID
    policy_key: SigningKey

    @property
    def policy_key_base64(self) -> str:
        """The policy public key as rooms put it in ``m.room.policy``."""
        return verify_key_base64(self.policy_key)


def load_identity(settings: Settings) -> Identity:
    """Load both keys; raise ``KeyFileError`` if either is missing or they are the same."""
    federation = load_signing_key(settings.homeserver_signing_key_path)
    policy = load_signing_key(settings.homeserver_event_signing_key_path)
    check_distinct(federation, policy)
    return Identity(settings.server_name, federation, key_id_of(federation), policy)

"""``GET /_matrix/key/v2/server``: our federation key, self-signed.

Only the federation key is published here; the policy key never is (MSC4284). Retired
federation keys (``PS_OLD_VERIFY_KEYS``) are listed in ``old_verify_keys`` with their
``expired_ts``, so after a rotation others can still verify what the old key signed
(Warden's join and leave events, the invites it countersigned). The document is signed
once and reused until it is halfway through its validity, so this endpoint costs no
signing per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response

from warden.federation.server_key_document import build_server_key_document
from warden.matrix.ids import KeyID
from warden.matrix.keys import VerifyKey, decode_verify_key
from warden.runtime.identity import Identity
from warden.settings import OldVerifyKey

logger = logging.getLogger(__name__)

VALIDITY_MS = 24 * 3600 * 1000


class ServerKeyEndpoint:
    """Serves the cached, self-signed key document."""

    def __init__(self, identity: Identity, old_keys: Sequence[OldVerifyKey] = ()) -> None:
        self.identity = identity
        self._old: dict[KeyID, tuple[VerifyKey, int]] = {}
        for old in old_keys:
            if old.key_id == identity.federation_key_id:
                # Still the current key: listing it as old too would confuse verifiers.
                logger.warning(
                    "PS_OLD_VERIFY_KEYS names the current federation key; ignored",
                    extra={"key_id": old.key_id},
                )
                continue
            key = decode_verify_key(old.key_id, old.verify_key_base64)
            self._old[old.key_id] = (key, old.expired_ts)
        self._body = b""
        self._refresh_at_ms = 0

    def document_bytes(self, now_ms: int | None = None) -> bytes:
        """The current document, re-signed when half its validity has passed."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if now >= self._refresh_at_ms:
            doc = build_server_key_document(
                self.identity.server_name,
                self.identity.federation_key,
                valid_for_ms=VALIDITY_MS,
                old_verify_keys=self._old,
                now_ms=now,
            )
            self._body = orjson.dumps(doc)
            self._refresh_at_ms = now + VALIDITY_MS // 2
        return self._body

    async def handle(self, request: Request) -> Response:
        """Route handler."""
        return Response(self.document_bytes(), media_type="application/json")

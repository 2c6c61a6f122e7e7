"""``GET /_matrix/key/v2/server``: our federation key, self-signed.

Only the federation key is published here; the policy key never is (MSC4284). The
document is signed once and reused until it is halfway through its validity, so this
endpoint costs no signing per request.
"""

from __future__ import annotations

import time

import orjson
from starlette.requests import Request
from starlette.responses import Response

from warden.federation.server_key_document import build_server_key_document
from warden.runtime.identity import Identity

VALIDITY_MS = 24 * 3600 * 1000


class ServerKeyEndpoint:
    """Serves the cached, self-signed key document."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
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
                now_ms=now,
            )
            self._body = orjson.dumps(doc)
            self._refresh_at_ms = now + VALIDITY_MS // 2
        return self._body

    async def handle(self, request: Request) -> Response:
        """Route handler."""
        return Response(self.document_bytes(), media_type="application/json")

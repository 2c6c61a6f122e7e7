"""A homeserver's federation endpoint for the moderation command tests.

``Destination`` is an ASGI app served over HTTPS by the tests: it serves a key
document, checks the X-Matrix signature of every ``PUT /send/{txnId}`` with Warden's
federation key, records every attempt, and, like Synapse, processes a transaction ID
once (a repeat of an accepted one is answered without being processed again).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson
from signedjson.key import generate_signing_key

from warden.federation.server_key_document import build_server_key_document
from warden.federation.xmatrix import verify_request
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import SigningKey, VerifyKey

OUR_NAME = "warden.test"


class Keyring:
    """Warden's federation key as the destination knows it (from our key document)."""

    def __init__(self, key_id: str, key: VerifyKey) -> None:
        self._key_id = key_id
        self._key = key

    async def get_verify_key(
        self,
        server_name: ServerName,
        key_id: KeyID,
        *,
        at_ms: int | None = None,
        requester: str | None = None,
    ) -> VerifyKey:
        if server_name != OUR_NAME or key_id != self._key_id:
            raise LookupError(f"unknown key {server_name} {key_id}")
        return self._key


@dataclass
class Attempt:
    """One ``PUT /send/{txnId}`` as received, and what was answered."""

    txn_id: str
    body: dict[str, Any]
    status: int


@dataclass
class Destination:
    """A homeserver's federation API as far as to-device EDUs go."""

    name: str
    keyring: Keyring
    status: int = 200  # what /send answers (503: temporarily down)
    # Seconds to wait before answering the next accepted transactions, one per entry
    # (the transaction is accepted first, as a homeserver acts before it answers).
    delays: list[float] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # txn ID -> body
    key: SigningKey = field(default_factory=lambda: generate_signing_key("dest"))
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer, delay = await self._route(scope, body)
        if delay:
            await asyncio.sleep(delay)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})

    async def _route(self, scope: dict[str, Any], body: bytes) -> tuple[int, Any, float]:
        path = scope["raw_path"].decode()
        if scope["method"] == "GET" and path == "/_matrix/key/v2/server":
            return 200, build_server_key_document(self.name, self.key), 0.0
        prefix = "/_matrix/federation/v1/send/"
        if scope["method"] != "PUT" or not path.startswith(prefix):
            return 404, {"errcode": "M_UNRECOGNIZED", "error": "not here"}, 0.0
        content = orjson.loads(body)
        headers = [v.decode() for k, v in scope["headers"] if k.lower() == b"authorization"]
        try:
            origin = await verify_request("PUT", path, content, headers, self.name, self.keyring)
        except Exception as exc:  # the test fails on any 401 below
            return 401, {"errcode": "M_UNAUTHORIZED", "error": str(exc)}, 0.0
        assert origin == OUR_NAME
        txn_id = path.removeprefix(prefix)
        with self.lock:
            self.attempts.append(Attempt(txn_id, content, self.status))
            if self.status != 200:
                return self.status, {"errcode": "M_UNKNOWN", "error": "down"}, 0.0
            # A repeat of an accepted transaction is answered, not processed again.
            self.accepted.setdefault(txn_id, content)
            delay = self.delays.pop(0) if self.delays else 0.0
        return 200, {"pdus": {}}, delay

    def commands(self) -> list[dict[str, Any]]:
        """Every command content processed, in order (repeats of a txn ID not counted)."""
        with self.lock:
            bodies = list(self.accepted.values())
        return [
            message
            for body in bodies
            for edu in body["edus"]
            for per_user in edu["content"]["messages"].values()
            for message in per_user.values()
        ]

    def event_ids(self) -> list[str]:
        return [c["event_id"] for c in self.commands()]

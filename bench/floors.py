"""The two baselines every workload is compared with, as raw ASGI apps.

* The **HTTP floor**: reads the request body and answers ``200 {}``. What the server
  stack (uvicorn on uvloop, HTTP/1.1 keep-alive) costs per request, before any work.
* The **crypto floor**: only the work no policy server can skip for an event it sees
  for the first time, with the product's own functions and nothing else (no NATS,
  Redis, PostgreSQL, filters, metrics or tracing): parse the body as canonical JSON,
  verify the X-Matrix signature (origin keys preloaded in memory), check the content
  hash, compute the redacted signing bytes once and from them the event ID, verify the
  sender's signature over those bytes, and sign them with the policy key.

Both run under ``warden.runtime.service`` exactly as the gateway's API listener does
(same uvicorn settings, uvloop, one process each), started as
``python -m bench.floors {http,crypto}`` with the gateway's ``PS_*`` settings
(``PS_HTTP_BIND``, ``PS_HTTP_METRICS_BIND``, ``PS_HOMESERVER_NAME``,
``PS_HOMESERVER_EVENT_SIGNING_KEY_PATH``) plus, for the crypto floor,
``BENCH_FLOOR_KEYS`` (``{server: {key_id: base64 key}}``) and ``BENCH_FLOOR_ROOMS``
(``{room_id: room_version}``), both JSON files.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import nacl.exceptions
import orjson
from starlette.types import Message, Receive, Scope, Send
from unpaddedbase64 import decode_base64, encode_base64

from warden.federation.xmatrix import verify_request
from warden.matrix.canonical_json import parse_canonical
from warden.matrix.errors import MatrixError, Unauthorized
from warden.matrix.event_hashes import (
    check_content_hash,
    event_id_from_reference_hash,
    redacted_signing_bytes,
)
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import POLICY_SERVER_KEY_ID, SigningKey, VerifyKey, decode_verify_key
from warden.matrix.room_versions import RoomVersion, get_room_version

_JSON_HEADERS = [(b"content-type", b"application/json")]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


async def http_floor(scope: Scope, receive: Receive, send: Send) -> None:
    """The HTTP floor: read the body, answer ``200 {}``."""
    if scope["type"] != "http":
        return
    await _read_body(receive)
    await _reply(send, 200, b"{}")


class MemoryKeys:
    """Origin verify keys held in memory (the keyring's best case: every key known)."""

    def __init__(self, table: dict[str, dict[str, str]]) -> None:
        self._keys: dict[tuple[str, str], VerifyKey] = {
            (server, key_id): decode_verify_key(key_id, b64)
            for server, keys in table.items()
            for key_id, b64 in keys.items()
        }

    async def get_verify_key(
        self,
        server_name: ServerName,
        key_id: KeyID,
        *,
        at_ms: int | None = None,
        requester: str | None = None,
    ) -> VerifyKey:
        """The key, or ``Unauthorized`` (a ``KeyringError`` is not needed here)."""
        key = self._keys.get((server_name, key_id))
        if key is None:
            raise Unauthorized(f"unknown key {server_name} {key_id}")
        return key

    def lookup(self, server_name: str, key_id: str) -> VerifyKey | None:
        """The key without the async interface."""
        return self._keys.get((server_name, key_id))


class CryptoFloor:
    """The crypto floor app (see the module docstring for exactly what it does)."""

    def __init__(
        self,
        server_name: str,
        policy_key: SigningKey,
        keys: dict[str, dict[str, str]],
        rooms: dict[str, str],
    ) -> None:
        self._server_name = server_name
        self._policy_key = policy_key
        self._keys = MemoryKeys(keys)
        self._rooms: dict[str, RoomVersion] = {
            room_id: get_room_version(v) for room_id, v in rooms.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one request: 200 with our signature, or a Matrix error."""
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        try:
            answer = await self._sign(scope, body)
        except MatrixError as exc:
            await _reply(send, exc.status, orjson.dumps(exc.to_dict()))
            return
        except (ValueError, KeyError, TypeError, nacl.exceptions.BadSignatureError) as exc:
            await _reply(send, 400, orjson.dumps({"errcode": "M_BAD_JSON", "error": str(exc)}))
            return
        await _reply(send, 200, answer)

    async def _sign(self, scope: Scope, body: bytes) -> bytes:
        pdu: dict[str, Any] = parse_canonical(body)
        auth = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
        await verify_request(
            "POST", scope["raw_path"].decode("latin-1"), pdu, auth, self._server_name, self._keys
        )
        room_version = self._rooms[pdu["room_id"]]
        if not check_content_hash(pdu):
            raise ValueError("content hash does not match")
        signing_bytes = redacted_signing_bytes(room_version, pdu)
        event_id = event_id_from_reference_hash(
            room_version, hashlib.sha256(signing_bytes).digest()
        )
        sender_server = pdu["sender"].split(":", 1)[1]
        signatures = pdu["signatures"][sender_server]
        checked = 0
        for key_id, signature in signatures.items():
            key = self._keys.lookup(sender_server, key_id)
            if key is not None:
                key.verify(signing_bytes, decode_base64(signature))
                checked += 1
        if not checked:
            raise ValueError(f"no known key of {sender_server} signed {event_id}")
        signature = encode_base64(self._policy_key.sign(signing_bytes).signature)
        return orjson.dumps({self._server_name: {POLICY_SERVER_KEY_ID: signature}})


def _load_json(variable: str) -> Any:
    with open(os.environ[variable], "rb") as f:
        return orjson.loads(f.read())


def main(argv: list[str]) -> int:
    """``python -m bench.floors {http,crypto}``: serve one floor until SIGTERM."""
    from warden.matrix.keys import load_signing_key
    from warden.runtime.service import bootstrap, run_async
    from warden.settings import Settings

    if len(argv) != 1 or argv[0] not in ("http", "crypto"):
        print("usage: python -m bench.floors {http,crypto}", file=sys.stderr)
        return 2
    kind = argv[0]
    settings = Settings()
    runtime = bootstrap(f"bench-{kind}-floor", settings)

    async def serve() -> None:
        app: Any
        if kind == "http":
            app = http_floor
        else:
            app = CryptoFloor(
                settings.homeserver_name,
                load_signing_key(settings.homeserver_event_signing_key_path),
                _load_json("BENCH_FLOOR_KEYS"),
                _load_json("BENCH_FLOOR_ROOMS"),
            )
        runtime.add_http_server("api", app, settings.http_bind)
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        await runtime.serve()

    return run_async(serve)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

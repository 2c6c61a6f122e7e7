"""The simulated origins' key servers: one HTTPS process, one listening port per origin.

A Matrix server name is its address, so each origin (``127.0.0.1:<port>``) needs its
own port; one uvicorn server listens on all of them and answers
``GET /_matrix/key/v2/server`` with the key document of the origin whose port the
request arrived on.

``python -m bench.keyserver SPEC``: ``SPEC`` is a JSON file
``{"cert": pem, "key": pem, "origins": [{"seed": base64, "version": str}, ...]}``. The
process binds one loopback port per origin, prints them as one JSON line (in the
order of ``origins``) and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import orjson
import uvicorn
from signedjson.key import decode_signing_key_base64
from starlette.types import Receive, Scope, Send

from warden.federation.server_key_document import build_server_key_document
from warden.matrix.keys import SigningKey

KEY_PATH = "/_matrix/key/v2/server"


class KeyServerApp:
    """Serves each origin's key document on that origin's port."""

    def __init__(self, keys_by_port: dict[int, SigningKey]) -> None:
        self._keys = keys_by_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request: the key document of the origin listening on this port."""
        if scope["type"] != "http":
            return
        port = int(scope["server"][1])
        key = self._keys.get(port)
        if scope["path"] != KEY_PATH or key is None:
            status, body = 404, b'{"errcode":"M_NOT_FOUND","error":"no such key"}'
        else:
            status, body = 200, orjson.dumps(build_server_key_document(f"127.0.0.1:{port}", key))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str]) -> int:
    """Bind, announce the ports, serve."""
    with open(argv[0], "rb") as f:
        spec: dict[str, Any] = orjson.loads(f.read())
    sockets: list[socket.socket] = []
    keys: dict[int, SigningKey] = {}
    for origin in spec["origins"]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.set_inheritable(True)
        port = int(sock.getsockname()[1])
        keys[port] = decode_signing_key_base64("ed25519", origin["version"], origin["seed"])
        sockets.append(sock)
    config = uvicorn.Config(
        KeyServerApp(keys),
        ssl_certfile=spec["cert"],
        ssl_keyfile=spec["key"],
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    print(orjson.dumps([s.getsockname()[1] for s in sockets]).decode(), flush=True)
    asyncio.run(uvicorn.Server(config).serve(sockets=sockets))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

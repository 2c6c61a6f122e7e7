"""A second homeserver for the end-to-end tests, and signed federation requests.

``FederationSigner`` makes X-Matrix-signed requests as any server whose key the test
holds (the second origin, or Warden itself, whose key files the test writes).

``SecondOrigin`` is a minimal homeserver: a real HTTPS server on loopback (certificate
from the test CA) serving its key document and accepting transactions, a name
``127.0.0.1:<port>``, and the client side of joining a room (make_join / send_join) and
of sending PDUs in a transaction. It builds, hashes and signs its events with Synapse's
own code (``add_hashes_and_signatures``, ``make_event_from_dict``), so what Synapse
receives is what another Synapse would send. It never asks a policy server for
anything: its events reach the room without Warden's signature.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import trustme
import uvicorn
from signedjson.key import generate_signing_key
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures
from synapse.events import make_event_from_dict

from tests.synapse.synapse_client import q
from warden.federation.server_key_document import build_server_key_document
from warden.federation.xmatrix import sign_request
from warden.matrix.keys import SigningKey

ALL_ROOM_VERSIONS = [str(v) for v in range(1, 13)]


class FederationSigner:
    """Signed federation requests as ``server_name`` with ``key``."""

    def __init__(self, server_name: str, key: SigningKey, ca_file: str) -> None:
        self.server_name = server_name
        self.key = key
        self._http = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=ca_file), timeout=httpx.Timeout(60.0)
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def request(
        self,
        method: str,
        base_url: str,
        destination: str,
        path: str,
        content: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """``method`` ``base_url + path`` (path with its query string, already encoded)."""
        auth = sign_request(self.server_name, destination, method, path, content, self.key)
        headers = {"Authorization": auth}
        body = None
        if content is not None:
            headers["Content-Type"] = "application/json"
            body = orjson.dumps(content)
        return await self._http.request(method, base_url + path, headers=headers, content=body)


def build_pdu(
    origin: str,
    key: SigningKey,
    room_version: str,
    fields: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    """Hash and sign ``fields`` as ``origin``; the event ID and the PDU as sent."""
    version = KNOWN_ROOM_VERSIONS[room_version]
    pdu = dict(fields)
    pdu.setdefault("origin_server_ts", int(time.time() * 1000))
    pdu.pop("signatures", None)
    pdu.pop("hashes", None)
    pdu.pop("unsigned", None)
    add_hashes_and_signatures(version, pdu, origin, key)
    event_id = make_event_from_dict(dict(pdu), version).event_id
    return event_id, pdu


@dataclass
class SecondOrigin:
    """A homeserver of the tests' own: key server, transaction sink, join and send."""

    ca: trustme.CA
    workdir: Path
    key: SigningKey = field(default_factory=lambda: generate_signing_key("a_2nd"))
    name: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    def app(self) -> Starlette:
        """Key document, transactions (recorded, answered 200), empty devices and profile."""

        async def keys(request: Request) -> Response:
            return JSONResponse(build_server_key_document(self.name, self.key))

        async def send(request: Request) -> Response:
            txn = orjson.loads(await request.body())
            self.received.append(txn)
            return JSONResponse({"pdus": {}})

        async def devices(request: Request) -> Response:
            user_id = request.path_params["user_id"]
            return JSONResponse({"user_id": user_id, "stream_id": 0, "devices": []})

        async def profile(request: Request) -> Response:
            return JSONResponse({})

        async def not_found(request: Request) -> Response:
            return JSONResponse({"errcode": "M_UNRECOGNIZED", "error": "not served"}, 404)

        return Starlette(
            routes=[
                Route("/_matrix/key/v2/server", keys, methods=["GET"]),
                Route("/_matrix/federation/v1/send/{txn_id}", send, methods=["PUT"]),
                Route("/_matrix/federation/v1/user/devices/{user_id}", devices, methods=["GET"]),
                Route("/_matrix/federation/v1/query/profile", profile, methods=["GET"]),
                Route("/{path:path}", not_found, methods=["GET", "PUT", "POST"]),
            ]
        )

    def start(self) -> None:
        """Serve HTTPS on 127.0.0.1 at a random port; sets ``name``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        leaf = self.ca.issue_cert("127.0.0.1")
        certfile, keyfile = self.workdir / "origin.pem", self.workdir / "origin.key"
        leaf.cert_chain_pems[0].write_to_path(str(certfile))
        leaf.private_key_pem.write_to_path(str(keyfile))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.name = f"127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app(),
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "second origin did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the HTTPS server."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(5)

    def user_id(self, localpart: str) -> str:
        """``@localpart:<our name>``."""
        return f"@{localpart}:{self.name}"

    def signer(self, ca_file: str) -> FederationSigner:
        """A ``FederationSigner`` as this origin."""
        return FederationSigner(self.name, self.key, ca_file)

    async def join(
        self, signer: FederationSigner, base_url: str, destination: str, room_id: str, user_id: str
    ) -> JoinResult:
        """make_join then send_join (v2) for ``user_id`` through ``destination``."""
        query = "&".join(f"ver={v}" for v in ALL_ROOM_VERSIONS)
        made = await signer.request(
            "GET",
            base_url,
            destination,
            f"/_matrix/federation/v1/make_join/{q(room_id)}/{q(user_id)}?{query}",
        )
        assert made.status_code == 200, f"make_join: {made.status_code} {made.text}"
        template = made.json()
        room_version = str(template.get("room_version", "1"))
        event_id, pdu = build_pdu(self.name, self.key, room_version, template["event"])
        sent = await signer.request(
            "PUT",
            base_url,
            destination,
            f"/_matrix/federation/v2/send_join/{q(room_id)}/{q(event_id)}",
            pdu,
        )
        assert sent.status_code == 200, f"send_join: {sent.status_code} {sent.text}"
        return JoinResult(room_version, event_id, pdu, sent.json())

    async def send_transaction(
        self,
        signer: FederationSigner,
        base_url: str,
        destination: str,
        pdus: list[dict[str, Any]],
    ) -> httpx.Response:
        """``PUT /_matrix/federation/v1/send/{txnId}`` with these PDUs and no EDU."""
        body = {
            "origin": self.name,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": pdus,
            "edus": [],
        }
        txn = uuid.uuid4().hex
        return await signer.request(
            "PUT", base_url, destination, f"/_matrix/federation/v1/send/{txn}", body
        )


@dataclass
class JoinResult:
    """What joining a room through send_join gave."""

    room_version: str
    event_id: str
    pdu: dict[str, Any]
    response: dict[str, Any]


async def fetch_pdu(
    signer: FederationSigner, base_url: str, destination: str, event_id: str
) -> dict[str, Any]:
    """``GET /_matrix/federation/v1/event/{eventId}``: the stored PDU as the server sends it."""
    response = await signer.request(
        "GET", base_url, destination, f"/_matrix/federation/v1/event/{q(event_id)}"
    )
    assert response.status_code == 200, f"GET event: {response.status_code} {response.text}"
    pdus = response.json()["pdus"]
    assert len(pdus) == 1, pdus
    pdu: dict[str, Any] = pdus[0]
    return pdu

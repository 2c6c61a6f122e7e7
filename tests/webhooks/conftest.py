"""Fixtures for the webhooks tests: a local HTTPS webhook target signed by a test CA.

``WebhookReceiver`` records every raw POST and, like a receiver that honours the
``Idempotency-Key`` header, processes each key once. Tests can script answers
(status, headers, delay) per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from nats.aio.client import Client as NATS

from tests.local_servers import ThreadedServer, start_threaded, stop_all
from warden.bus.streams import ensure_verdicts_stream
from warden.settings import DEFAULT_DENIED_NETWORKS

# The default deny list without loopback, where the tests' target listens.
LOOPBACK = {"127.0.0.0/8", "::1/128"}
DENIED_EXCEPT_LOOPBACK = [n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in LOOPBACK]


@dataclass
class Answer:
    """One scripted answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class ReceivedPost:
    """A request as the target received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class WebhookReceiver:
    """A webhook target that records raw requests and processes each key once."""

    script: list[Answer] = field(default_factory=list)
    raw: list[ReceivedPost] = field(default_factory=list)
    processed: dict[str, ReceivedPost] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["raw_path"].decode()
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode()
        post = ReceivedPost(scope["method"], path, headers, body)
        with self.lock:
            self.raw.append(post)
            answer = self.script.pop(0) if self.script else Answer()
            key = headers.get("idempotency-key", "")
            # Taken on receipt, as a receiver that stores before answering would.
            if 200 <= answer.status < 300 and key and key not in self.processed:
                self.processed[key] = post
        if answer.delay:
            await asyncio.sleep(answer.delay)
        raw_headers = [(b"content-type", b"application/json")]
        raw_headers += [(k.encode(), v.encode()) for k, v in answer.headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": b"{}"})


LocalHTTPSServer = ThreadedServer


@pytest.fixture(scope="session")
def webhook_ca() -> trustme.CA:
    """The CA that signs the test target's certificate."""
    return trustme.CA()


@pytest.fixture
def webhook_ca_file(webhook_ca: trustme.CA, tmp_path: Path) -> str:
    """The CA certificate as a PEM file (for ``PS_WEBHOOK_CA_FILE``)."""
    path = tmp_path / "webhook-ca.pem"
    webhook_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def receiver() -> WebhookReceiver:
    """A fresh ``WebhookReceiver`` (not yet listening)."""
    return WebhookReceiver()


@pytest.fixture
def https_target(
    webhook_ca: trustme.CA, tmp_path: Path
) -> Iterator[Callable[[Any], Awaitable[LocalHTTPSServer]]]:
    """Serve an ASGI app over HTTPS as ``localhost``/``127.0.0.1``: ``await https_target(app)``."""
    started: list[LocalHTTPSServer] = []

    async def start(app: Any) -> LocalHTTPSServer:
        leaf = webhook_ca.issue_cert("localhost", "127.0.0.1")
        certfile, keyfile = tmp_path / f"t{len(started)}.pem", tmp_path / f"t{len(started)}.key"
        leaf.cert_chain_pems[0].write_to_path(str(certfile))
        leaf.private_key_pem.write_to_path(str(keyfile))
        entry = await start_threaded(app, certfile=str(certfile), keyfile=str(keyfile))
        started.append(entry)
        return entry

    yield start
    stop_all(started)


@pytest.fixture
async def verdicts_js(nats_client: NATS) -> Any:
    """A JetStream context with the verdicts stream in place."""
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    return js

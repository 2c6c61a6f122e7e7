"""Real HTTP(S) servers on loopback for tests: an ASGI app under uvicorn in a thread.

Every test that needs a remote party (an origin's key server, a homeserver's client API,
a webhook target) starts one of these; the fixtures stop them after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import uvicorn


@dataclass
class ThreadedServer:
    """A uvicorn server running an ASGI app in a thread."""

    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets), usable as a server name."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://<address>``."""
        return f"http://{self.address}"

    def url(self, path: str = "/hook", host: str = "localhost", scheme: str = "https") -> str:
        """A URL on this server under another host name (e.g. ``localhost``)."""
        return f"{scheme}://{host}:{self.port}{path}"


async def start_threaded(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> ThreadedServer:
    """Serve ``app`` on ``host:port`` (HTTPS when a certificate is given) until stopped."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(
        app,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "test server did not start"
    return ThreadedServer(host, sock.getsockname()[1], server, thread)


def stop_all(servers: Iterable[ThreadedServer]) -> None:
    """Stop servers started by ``start_threaded`` and wait for their threads."""
    servers = list(servers)
    for entry in servers:
        entry.server.should_exit = True
    for entry in servers:
        entry.thread.join(5)


@contextlib.asynccontextmanager
async def serve_behind_front(app: Any, limits: Any, port: int) -> AsyncIterator[None]:
    """Serve ``app`` on ``127.0.0.1:port`` in this event loop with Warden's HTTP front
    (``LimitedHttpToolsProtocol`` enforcing ``limits``) until the block ends."""
    from warden.runtime.http_limits import protocol_class

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=protocol_class(limits),
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task

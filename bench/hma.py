"""The local HMA service and media repository of the image window, in the bench process.

``warden.dev.hma_fakes`` speaks HMA's and the media API's wire protocols; here they run
under uvicorn in threads, so the filter workers download, hash and look up for real
(over loopback) while the bench measures.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from warden.dev.hma_fakes import HmaService, MediaRepository

MEDIA_SERVER_NAME = "media.bench"  # the server name in the window's mxc URIs


@dataclass
class HmaServices:
    """The running services, their URLs and what they were asked."""

    media: MediaRepository
    hma: HmaService
    media_url: str
    hma_url: str
    _servers: list[uvicorn.Server] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The filter workers' settings for these services."""
        return {
            "PS_HMA_API_URL": self.hma_url,
            "PS_HMA_API_KEY": self.hma.api_key,
            "PS_HOMESERVER_MEDIA_CLIENT_URL": self.media_url,
            "PS_HOMESERVER_MEDIA_CLIENT_ACCESS_TOKEN": self.media.access_token,
            # The media repository is on loopback, which the default guard refuses.
            "PS_HOMESERVER_MEDIA_CLIENT_ALLOWED_NETWORKS": "127.0.0.0/8",
            "PS_HOMESERVER_MEDIA_CLIENT_DENIED_NETWORKS": "",
        }

    def counts(self) -> dict[str, int]:
        """Downloads and hash requests so far (each distinct media once, if all is well)."""
        return {
            "downloads": sum(self.media.downloads.values()),
            "hma_hashes": sum(self.hma.hashed.values()),
            "hma_lookups": sum(self.hma.lookups.values()),
        }

    def stop(self) -> None:
        """Stop the servers and wait for their threads."""
        for server in self._servers:
            server.should_exit = True
        for thread in self._threads:
            thread.join(5)


async def _serve(app: Any, services: HmaServices) -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    services._servers.append(server)
    services._threads.append(thread)
    for _ in range(500):
        if server.started:
            return f"http://127.0.0.1:{sock.getsockname()[1]}"
        await asyncio.sleep(0.01)
    raise RuntimeError("a local HMA or media server did not start")


async def start_hma_services() -> HmaServices:
    """Start both services on loopback."""
    media, hma = MediaRepository(), HmaService()
    services = HmaServices(media, hma, "", "")
    services.media_url = await _serve(media.app(), services)
    services.hma_url = await _serve(hma.app(), services)
    return services

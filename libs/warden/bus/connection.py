"""Connecting to NATS the same way in every service."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS

logger = logging.getLogger(__name__)


async def connect_nats(
    url: str, *, name: str, initial_timeout: float = 60.0, connect_timeout: int = 5
) -> NATS:
    """Connect with unbounded reconnects (a NATS restart must not kill the service).

    nats-py retries the first connection forever too when reconnects are unbounded,
    so the first connection is bounded by ``initial_timeout`` (``TimeoutError``).
    """

    async def on_disconnect() -> None:
        logger.warning("nats disconnected", extra={"event": "nats_disconnected"})

    async def on_reconnect() -> None:
        logger.info("nats reconnected", extra={"event": "nats_reconnected"})

    async def on_error(exc: Exception) -> None:
        logger.warning("nats error", extra={"event": "nats_error", "error": str(exc)})

    nc = NATS()
    connecting = nc.connect(
        url,
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        allow_reconnect=True,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )
    try:
        await asyncio.wait_for(connecting, initial_timeout)
    except TimeoutError:
        await nc.close()
        raise TimeoutError(f"no NATS server answered at {url} within {initial_timeout}s") from None
    return nc


async def check_nats(nc: NATS) -> None:
    """Readiness: connected, and the server answers a flush round trip."""
    if not nc.is_connected:
        raise ConnectionError("not connected to NATS")
    await nc.flush(timeout=2)

"""A Redis client that finds its master through Redis Sentinel (``PS_REDIS_SENTINELS``).

redis-py's ``Sentinel.master_for`` asks the sentinels for the master's address before each
new connection, and drops idle connections when the address changes (a failover). Its pool
fails a command at once when every connection is busy, like redis-py's default pool; Warden
wants the blocking behaviour of its plain pool (see ``dependencies.redis_client``), so the
pool here is redis-py's sentinel pool on top of its blocking pool.

What ``PS_REDIS_URL`` says still applies to the master: user and password (Redis ACLs),
database number and TLS (``rediss://``, ``ssl_*`` query parameters). TLS applies to the
sentinels too; their password is ``PS_REDIS_SENTINEL_PASSWORD``.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from warden.settings import Settings


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master lookup with the blocking pool's wait for a free connection.

    ``SentinelConnectionPool.__init__`` passes the remaining arguments (``max_connections``,
    ``timeout``) on to ``BlockingConnectionPool.__init__`` through the MRO.
    """


class SentinelRedis(aioredis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    # Not "sentinel": Redis already has a method of that name (the SENTINEL command).
    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the master's pool and the sentinel clients."""
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            # Each sentinel client in turn: Sentinel.aclose is newer than redis 5.0.1.
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def parse_sentinels(entries: list[str]) -> list[tuple[str, int]]:
    """``host:port`` entries (validated by the settings) as (host, port) pairs."""
    out = []
    for entry in entries:
        host, _, port = entry.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def sentinel_client(s: Settings, **pool_kwargs: Any) -> SentinelRedis:
    """A client of ``PS_REDIS_SENTINEL_MASTER``'s current master."""
    master_kwargs: dict[str, Any] = dict(parse_url(s.redis_url))
    for where in ("host", "port", "path"):
        master_kwargs.pop(where, None)
    connection_class = master_kwargs.pop("connection_class", None)
    tls = connection_class is not None and issubclass(connection_class, SSLConnection)
    ssl_kwargs = {k: v for k, v in master_kwargs.items() if k.startswith("ssl_")}
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": pool_kwargs.get("socket_connect_timeout"),
        "socket_timeout": pool_kwargs.get("socket_timeout"),
        **ssl_kwargs,
    }
    if tls:
        sentinel_kwargs["ssl"] = True
    if s.redis_sentinel_password:
        sentinel_kwargs["password"] = s.redis_sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        parse_sentinels(s.redis_sentinels), sentinel_kwargs=sentinel_kwargs
    )
    client = sentinel.master_for(
        s.redis_sentinel_master,
        redis_class=SentinelRedis,
        connection_pool_class=BlockingSentinelConnectionPool,
        ssl=tls,  # SentinelConnectionPool picks its TLS connection class from this
        **master_kwargs,
        **pool_kwargs,
    )
    assert isinstance(client, SentinelRedis)
    client.sentinel_manager = sentinel
    return client

"""Start-up joins never stop the gateway, whatever goes wrong."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from warden.settings import Settings
from warden_gateway.room_joins import StartupJoins


async def test_an_unexpected_error_is_retried_not_fatal(
    redis_client: aioredis.Redis, monkeypatch: Any
) -> None:
    joins = StartupJoins(
        joiner=None,  # type: ignore[arg-type]  # never reached: _pending is replaced
        redis=redis_client,
        settings=Settings(join_room_ids="!a:example.org"),
        start_delay_seconds=0,
        lock_poll_seconds=0.01,
    )
    calls = 0

    async def pending() -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("an InterfaceError, a bug: anything but a known dependency")
        return []  # then everything is joined

    monkeypatch.setattr(joins, "_pending", pending)
    await joins.run()  # returns normally instead of raising into the service runtime
    assert calls == 2

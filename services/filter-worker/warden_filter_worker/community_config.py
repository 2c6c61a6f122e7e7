"""Communities' effective configurations, cached per worker and dropped on change.

The instance defaults (code defaults + ``PS_*``) are read once at start; a community's
stored JSON is layered over them on first use and kept until a message on
``CONFIG_CHANGED_SUBJECT`` says it changed (every worker subscribes, so a change
reaches all of them within a NATS round trip, without restarts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.policy.config import ConfigError, EffectiveConfig, check_value, known_keys
from warden.storage.communities import get_community
from warden_filter_worker.metrics import CONFIG_INVALIDATIONS

logger = logging.getLogger(__name__)


class UnknownCommunity(LookupError):
    """The community named in a request does not exist."""


def layer_stored_config(community_id: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The usable part of a community's stored JSON.

    The admin API validates what it stores, but a row may predate a key's removal or a
    type change; such keys are skipped (and logged) rather than failing every event of
    the community.
    """
    keys = known_keys()
    out: dict[str, Any] = {}
    for name, value in stored.items():
        key = keys.get(name)
        if key is None or key.instance_only:
            logger.warning(
                "ignoring stored config key",
                extra={"community_id": community_id, "key": name, "reason": "unknown"},
            )
            continue
        try:
            out[name] = check_value(key, value)
        except ConfigError as exc:
            logger.warning(
                "ignoring stored config key",
                extra={"community_id": community_id, "key": name, "reason": exc.message},
            )
    return out


# Changes arrive on NATS within a second; this bound only covers a notification lost
# while the worker was disconnected from NATS (core NATS does not replay).
MAX_AGE_SECONDS = 60.0


class CommunityConfigCache:
    """community ID → ``EffectiveConfig``, loaded from PostgreSQL on first use."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        instance: Mapping[str, Any],
        *,
        max_age_seconds: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._instance = dict(instance)
        self._max_age = max_age_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, EffectiveConfig]] = {}
        # Bumped on every invalidation so that a load racing a change is not cached.
        self._generation = 0
        self._subscription: Subscription | None = None

    async def get(self, community_id: str) -> EffectiveConfig:
        """The community's effective configuration; raises ``UnknownCommunity``."""
        hit = self._entries.get(community_id)
        if hit is not None and self._clock() - hit[0] < self._max_age:
            return hit[1]
        generation = self._generation
        community = await get_community(self._pool, community_id)
        if community is None:
            raise UnknownCommunity(community_id)
        config = EffectiveConfig(
            self._instance, layer_stored_config(community_id, community.config)
        )
        if generation == self._generation:
            self._entries[community_id] = (self._clock(), config)
        return config

    def invalidate(self, community_id: str | None = None) -> None:
        """Drop one community's entry, or every entry when ``community_id`` is None."""
        self._generation += 1
        if community_id is None:
            self._entries.clear()
        else:
            self._entries.pop(community_id, None)
        CONFIG_INVALIDATIONS.inc()

    async def subscribe(self, nc: NATS) -> None:
        """Drop cached entries whenever a config change is announced."""

        async def on_change(msg: Msg) -> None:
            community_id: str | None = None
            try:
                body = orjson.loads(msg.data)
                if isinstance(body, dict) and isinstance(body.get("community_id"), str):
                    community_id = body["community_id"]
            except orjson.JSONDecodeError:
                pass  # unreadable: drop everything, the safe choice
            # A message naming a community drops that entry. Anything else (a room
            # moving between communities, an unreadable body) drops every entry: rare,
            # and reloading is cheap.
            self.invalidate(community_id)
            logger.info(
                "community config cache invalidated",
                extra={"community_id": community_id or "*"},
            )

        self._subscription = await nc.subscribe(CONFIG_CHANGED_SUBJECT, cb=on_change)

    async def unsubscribe(self) -> None:
        """Stop listening for changes."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

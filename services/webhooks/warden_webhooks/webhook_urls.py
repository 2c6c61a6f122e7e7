"""Each community's ``webhook_url``, cached briefly.

The effective value layers the community's stored config over the instance default
(``PS_WEBHOOK_URL``, usually empty). Entries live ``ttl`` seconds, and a message on
``CONFIG_CHANGED_SUBJECT`` (sent by the admin API after a change) drops them at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.policy.config import EffectiveConfig
from warden.storage.communities import get_community

logger = logging.getLogger(__name__)

WEBHOOK_URL_KEY = "webhook_url"
DEFAULT_TTL_SECONDS = 30.0


class WebhookURLs:
    """community ID → its effective webhook URL ("" when none)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        instance: Mapping[str, Any],
        *,
        ttl: float = DEFAULT_TTL_SECONDS,
    ) -> None:
        self._pool = pool
        self._instance = dict(instance)
        self._ttl = ttl
        self._entries: dict[str, tuple[float, str]] = {}
        self._generation = 0  # a load racing an invalidation is not cached
        self._subscription: Subscription | None = None

    async def get(self, community_id: str) -> str:
        """The community's webhook URL; "" when it has none or does not exist."""
        now = time.monotonic()
        hit = self._entries.get(community_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self._generation
        community = await get_community(self._pool, community_id)
        url = ""
        if community is not None:
            stored = dict(community.config)
            if not isinstance(stored.get(WEBHOOK_URL_KEY, ""), str):
                stored.pop(WEBHOOK_URL_KEY)  # a malformed row: fall back to the default
            url = EffectiveConfig(self._instance, stored).get_str(WEBHOOK_URL_KEY).strip()
        if generation == self._generation:
            self._entries[community_id] = (now + self._ttl, url)
        return url

    def invalidate(self, community_id: str | None = None) -> None:
        """Forget one community's URL, or all of them."""
        self._generation += 1
        if community_id is None:
            self._entries.clear()
        else:
            self._entries.pop(community_id, None)

    async def subscribe(self, nc: NATS) -> None:
        """Drop cached URLs whenever a config change is announced."""

        async def on_change(msg: Msg) -> None:
            community_id: str | None = None
            try:
                body = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict):
                if isinstance(body.get("community_id"), str):
                    community_id = body["community_id"]
                elif "room_id" in body:
                    return  # verdicts name their community; nothing cached per room
            self.invalidate(community_id)

        self._subscription = await nc.subscribe(CONFIG_CHANGED_SUBJECT, cb=on_change)

    async def unsubscribe(self) -> None:
        """Stop listening for changes."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

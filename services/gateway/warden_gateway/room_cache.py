"""Which rooms are protected, cached briefly in process.

Every ``/sign`` needs the room's record (its version and community); a room Warden was
kicked or banned from has none (the spec: a policy server MUST have a joined user).
Records change
rarely, so each replica keeps them (and the fact that a room is *not* protected) for a
few seconds. The admin API publishes ``{"room_id": ...}`` on ``CONFIG_CHANGED_SUBJECT``
when a room is added, moved or removed; every replica drops that entry at once, so the
TTL only bounds staleness when such a message is lost.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import asyncpg
import orjson
from nats.aio.msg import Msg

from warden.storage.records import Room
from warden.storage.rooms import get_active_room, get_rooms

logger = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 10.0
DEFAULT_SIZE = 10_000


class RoomCache:
    """``get_room`` with a bounded, short-lived in-process cache (negative answers too)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Room | None]] = OrderedDict()

    async def get(self, room_id: str) -> Room | None:
        """The room's record, or None when Warden does not protect it or was removed
        from it (``rooms.get_active_room``).

        Raises the pool's errors (``asyncpg.PostgresError``, ``OSError``) when the
        database cannot answer and nothing is cached.
        """
        now = self._clock()
        item = self._entries.get(room_id)
        if item is not None and item[0] > now:
            self._entries.move_to_end(room_id)
            return item[1]
        room = await get_active_room(self._pool, room_id)
        self._entries[room_id] = (now + self._ttl, room)
        self._entries.move_to_end(room_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return room

    async def get_many(self, room_ids: list[str]) -> dict[str, Room | None]:
        """``get`` for several rooms: the ones not cached are read in one query.

        A ``/send`` transaction names up to 50 rooms; one lookup each would take up to
        50 of the pool's connections at once for a single transaction. Only protected
        rooms are cached from here: the rooms a transaction names are the sender's
        choice, and caching its made-up ones would evict the entries ``/sign`` needs.
        """
        now = self._clock()
        found: dict[str, Room | None] = {}
        missing: list[str] = []
        for room_id in dict.fromkeys(room_ids):
            item = self._entries.get(room_id)
            if item is not None and item[0] > now:
                self._entries.move_to_end(room_id)
                found[room_id] = item[1]
            else:
                missing.append(room_id)
        if missing:
            rooms = await get_rooms(self._pool, missing)
            for room_id in missing:
                room = rooms.get(room_id)
                found[room_id] = room
                if room is not None:
                    self._entries[room_id] = (now + self._ttl, room)
                    self._entries.move_to_end(room_id)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return found

    def invalidate(self, room_id: str) -> None:
        """Forget one room."""
        self._entries.pop(room_id, None)

    def clear(self) -> None:
        """Forget every room."""
        self._entries.clear()

    async def on_config_changed(self, msg: Msg) -> None:
        """NATS callback for ``CONFIG_CHANGED_SUBJECT``.

        ``{"room_id": ...}`` drops that room; any other message (a community change, or
        one that cannot be read) drops everything, which is always safe.
        """
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            body = None
        room_id = body.get("room_id") if isinstance(body, dict) else None
        if isinstance(room_id, str):
            self.invalidate(room_id)
        else:
            self.clear()
        logger.debug("room cache invalidated", extra={"room_id": room_id})

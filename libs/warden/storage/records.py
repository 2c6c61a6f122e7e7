"""Rows as typed records, shared by every service that reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Room:
    """A room protected by Warden."""

    room_id: str
    room_version: str
    community_id: str
    moderator_user_id: str = ""
    last_state_update_ts: int = 0

    def to_api(self) -> dict[str, Any]:
        """The admin API's shape (policyserv's field names)."""
        return {
            "room_id": self.room_id,
            "room_version": self.room_version,
            "moderator_user_id": self.moderator_user_id,
            "last_cached_state_timestamp": self.last_state_update_ts,
            "community_id": self.community_id,
        }


@dataclass(frozen=True)
class Community:
    """A community: its rooms share one configuration layered over the instance's."""

    community_id: str
    name: str
    config: dict[str, Any]
    can_self_join_rooms: bool = False
    # Only the hash is stored (warden.storage.communities.hash_access_token).
    api_access_token_hash: str | None = None

    def to_api(self) -> dict[str, Any]:
        """The admin API's shape (policyserv's field names; the token is never shown)."""
        return {
            "community_id": self.community_id,
            "name": self.name,
            "config": self.config,
            "can_self_join_rooms": self.can_self_join_rooms,
        }

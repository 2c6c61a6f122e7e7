"""A small async Client-Server API helper for the end-to-end tests.

One ``MatrixClient`` per user (its access token) on Synapse's plain-HTTP client listener.
Methods that a test may expect to fail return the ``httpx.Response``; the rest raise
``AssertionError`` with the status and body when Synapse does not answer 200.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

_TIMEOUT = httpx.Timeout(60.0)


def q(value: str) -> str:
    """Percent-encode a path segment (room, event and user IDs, server names)."""
    return quote(value, safe="")


class MatrixClient:
    """Client-Server API calls as one user."""

    def __init__(self, base_url: str, access_token: str, user_id: str) -> None:
        self.base_url = base_url
        self.user_id = user_id
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {access_token}"},
            timeout=_TIMEOUT,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Any request under the client listener."""
        return await self._http.request(method, path, **kwargs)

    async def _ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        assert response.status_code == 200, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    async def create_room(self, **body: Any) -> str:
        """``POST /createRoom``; the new room's ID."""
        data = await self._ok("POST", "/_matrix/client/v3/createRoom", json=body)
        return str(data["room_id"])

    async def join(self, room_id_or_alias: str, via: list[str] | None = None) -> str:
        """``POST /join/{roomIdOrAlias}``; the room ID."""
        params = [("server_name", s) for s in via or []]
        data = await self._ok(
            "POST", f"/_matrix/client/v3/join/{q(room_id_or_alias)}", params=params, json={}
        )
        return str(data["room_id"])

    async def invite(self, room_id: str, user_id: str) -> httpx.Response:
        """``POST /rooms/{roomId}/invite``."""
        return await self._http.post(
            f"/_matrix/client/v3/rooms/{q(room_id)}/invite", json={"user_id": user_id}
        )

    async def send_message(self, room_id: str, body: str) -> httpx.Response:
        """``PUT /rooms/{roomId}/send/m.room.message/{txnId}`` with an ``m.text`` body."""
        return await self.send_event(room_id, "m.room.message", {"msgtype": "m.text", "body": body})

    async def send_event(
        self, room_id: str, event_type: str, content: dict[str, Any]
    ) -> httpx.Response:
        """``PUT /rooms/{roomId}/send/{type}/{txnId}`` with a fresh transaction ID."""
        txn = uuid.uuid4().hex
        return await self._http.put(
            f"/_matrix/client/v3/rooms/{q(room_id)}/send/{q(event_type)}/{txn}", json=content
        )

    async def set_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> httpx.Response:
        """``PUT /rooms/{roomId}/state/{type}/{stateKey}``."""
        return await self._http.put(
            f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}",
            json=content,
        )

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        """The room's current state as client events."""
        data = await self._ok("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state")
        assert isinstance(data, list)
        return data

    async def state_event(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        """The current state event of that type and key (client format), or None."""
        for event in await self.state(room_id):
            if event["type"] == event_type and event.get("state_key") == state_key:
                return event
        return None

    async def event(self, room_id: str, event_id: str) -> httpx.Response:
        """``GET /rooms/{roomId}/event/{eventId}`` (404 for events the user may not see)."""
        return await self._http.get(f"/_matrix/client/v3/rooms/{q(room_id)}/event/{q(event_id)}")

    async def messages(self, room_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` timeline events, newest first (``/messages?dir=b``)."""
        data = await self._ok(
            "GET",
            f"/_matrix/client/v3/rooms/{q(room_id)}/messages",
            params={"dir": "b", "limit": str(limit)},
        )
        return list(data["chunk"])

    async def joined_members(self, room_id: str) -> dict[str, Any]:
        """``GET /rooms/{roomId}/joined_members``: user ID → profile."""
        data = await self._ok("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/joined_members")
        return dict(data["joined"])

    async def redact(self, room_id: str, event_id: str, reason: str = "test") -> httpx.Response:
        """``PUT /rooms/{roomId}/redact/{eventId}/{txnId}``."""
        return await self._http.put(
            f"/_matrix/client/v3/rooms/{q(room_id)}/redact/{q(event_id)}/{uuid.uuid4().hex}",
            json={"reason": reason},
        )

    async def leave(self, room_id: str) -> httpx.Response:
        """``POST /rooms/{roomId}/leave``."""
        return await self._http.post(f"/_matrix/client/v3/rooms/{q(room_id)}/leave", json={})


async def eventually(
    probe: Callable[[], Any],
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
    what: str = "condition",
) -> Any:
    """Await ``probe()`` until it returns something truthy; fail after ``timeout`` seconds.

    Only a bound on waiting (never a timing assertion): the failure message says what was
    awaited and the probe's last result.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)

"""Typed Matrix identifiers.

These are ``NewType`` wrappers: free at run time, but they let mypy tell a room ID
from a user ID or a server name in signatures across the code base.
"""

from __future__ import annotations

from typing import NewType

ServerName = NewType("ServerName", str)
"""A server name: ``example.org``, ``example.org:8448``, ``1.2.3.4`` or ``[::1]:8448``."""

UserID = NewType("UserID", str)
"""``@localpart:server.name``."""

RoomID = NewType("RoomID", str)
"""``!opaque:server.name``, or ``!<reference hash>`` from room version 12."""

EventID = NewType("EventID", str)
"""``$opaque:server.name`` (room versions 1 and 2) or ``$<reference hash>`` (3 and later)."""

KeyID = NewType("KeyID", str)
"""``<algorithm>:<version>``, e.g. ``ed25519:a_XyZw``."""


def server_name_of(identifier: str) -> ServerName:
    """Return the server part of a user, room (v1-v11) or event (v1-v2) ID.

    Raises ``ValueError`` when the identifier has no server part.
    """
    _, sep, server = identifier.partition(":")
    if not sep or not server:
        raise ValueError(f"identifier has no server part: {identifier!r}")
    return ServerName(server)

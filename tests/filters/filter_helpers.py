"""Building events, configurations and filter contexts for filter tests."""

from __future__ import annotations

import uuid
from typing import Any

from warden.filters.base import FilterContext, FilterDeps
from warden.policy.config import EffectiveConfig, instance_defaults

OWN_USER = "@policyserv:warden.test"
ROOM = "!room:example.org"
ALICE = "@alice:example.org"


def config(environ: dict[str, str] | None = None, **community: Any) -> EffectiveConfig:
    """Code defaults, overlaid with ``environ`` (as PS_* variables), then ``community``."""
    return EffectiveConfig(instance_defaults(environ or {}), community)


def event(
    event_type: str = "m.room.message",
    content: dict[str, Any] | None = None,
    *,
    sender: str = ALICE,
    room_id: str = ROOM,
    state_key: str | None = None,
) -> dict[str, Any]:
    """A PDU-shaped event."""
    ev: dict[str, Any] = {
        "type": event_type,
        "sender": sender,
        "room_id": room_id,
        "content": content if content is not None else {},
        "origin_server_ts": 1,
        "depth": 1,
        "auth_events": [],
        "prev_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    if state_key is not None:
        ev["state_key"] = state_key
    return ev


def message(body: Any = "hello", msgtype: str = "m.text", **extra: Any) -> dict[str, Any]:
    """An ``m.room.message`` event."""
    return event("m.room.message", {"msgtype": msgtype, "body": body, **extra})


def new_event_id() -> str:
    """A unique event ID."""
    return f"${uuid.uuid4().hex}"


def context(
    ev: dict[str, Any],
    deps: FilterDeps,
    cfg: EffectiveConfig | None = None,
    *,
    community_id: str = "default",
    event_id: str | None = None,
    now_ms: int = 1_000_000,
) -> FilterContext:
    """A filter context for one event."""
    return FilterContext(
        event=ev,
        event_id=event_id or new_event_id(),
        room_id=str(ev.get("room_id", "")),
        community_id=community_id,
        config=cfg if cfg is not None else config(),
        deps=deps,
        now_ms=now_ms,
    )

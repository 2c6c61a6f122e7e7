"""Seeding a room's learned state for the room-state tests: what a verified join
would have taught Warden (create event, power levels, join rules, members)."""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.gateway.policy_harness import Origin
from warden.storage import room_state


def room_snapshot(
    origin: Origin,
    room_id: str,
    version: str,
    *,
    members: dict[str, int],
    join_rule: str = "public",
    extra_joined: tuple[str, ...] = (),
    power_levels: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A state snapshot: the first member creates the room; ``members`` maps users to
    their power level (v12 creators are left out of power levels, as the spec wants);
    ``extra_joined`` are joined members of other servers (their events are signed by
    ``origin`` too, which seeding does not check)."""
    creator = next(iter(members))
    create_content: dict[str, Any] = {"room_version": version}
    if version in {str(v) for v in range(1, 11)}:
        create_content["creator"] = creator
    events = [
        origin.event(
            room_id,
            version,
            event_type="m.room.create",
            state_key="",
            content=create_content,
            sender=creator,
        )
    ]
    users = {u: p for u, p in members.items() if version != "12" or u != creator}
    pl = power_levels if power_levels is not None else {"users": users}
    events.append(
        origin.event(
            room_id,
            version,
            event_type="m.room.power_levels",
            state_key="",
            content=pl,
            sender=creator,
        )
    )
    events.append(
        origin.event(
            room_id,
            version,
            event_type="m.room.join_rules",
            state_key="",
            content={"join_rule": join_rule},
            sender=creator,
        )
    )
    for user in [*members, *extra_joined]:
        events.append(
            origin.event(
                room_id,
                version,
                event_type="m.room.member",
                state_key=user,
                content={"membership": "join"},
                sender=user,
            )
        )
    return events


async def seed_room(
    pool: asyncpg.Pool,
    origin: Origin,
    room_id: str,
    version: str,
    *,
    members: dict[str, int],
    our_user_id: str = "",
    **kw: Any,
) -> None:
    """Seed the room's learned state as a verified join would."""
    await room_state.seed_from_state(
        pool,
        room_id,
        version,
        room_snapshot(origin, room_id, version, members=members, **kw),
        our_user_id=our_user_id,
    )

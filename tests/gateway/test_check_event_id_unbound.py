"""``check/event_id`` of a room v1/v2 refusal imported from policyserv and not yet bound
to content: the event is fetched, the workers bind the refusal to the verified copy and
answer it with policyserv's harms; later asks are answered from the bound verdict."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
from unpaddedbase64 import encode_base64

from tests.gateway.real_worker import real_worker
from tests.gateway.test_check_event_id import (
    Caller,
    Checker,
    EventServer,
    _event,
    _protected_room,
    make_checker,
    new_caller,
    start_server,
)
from tests.storage.test_unbound_verdicts import store_unbound
from warden.matrix.event_hashes import compute_reference_hash
from warden.matrix.room_versions import get_room_version
from warden.policy.harms import HARMS_FIELD
from warden.storage.verdicts import get_verdict

__all__ = ["make_checker", "new_caller", "real_worker", "start_server"]  # fixtures


async def test_an_unbound_refusal_is_bound_to_the_fetched_event(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "1")
    # Warden's own filters would allow it: only the imported refusal can refuse it.
    event = _event(remote, room_id, "1", "hello there", "alice")
    event_id = remote.serve(event, "1")
    await store_unbound(pg_pool, event_id)

    r = await checker.check(caller, {"event_id": event_id})
    assert r.status_code == 400, r.text
    assert r.json()[HARMS_FIELD] == ["org.matrix.msc4456.spam"]
    assert remote.fetches == 1
    stored = await get_verdict(pg_pool, event_id)
    assert stored is not None
    digest = compute_reference_hash(get_room_version("1"), event)
    assert stored.reference_hash == encode_base64(digest)
    assert (stored.room_id, stored.community_id) == (room_id, caller.community_id)

    again = await checker.check(caller, {"event_id": event_id})
    assert (again.status_code, again.json()) == (400, r.json())
    assert remote.fetches == 1  # bound now: answered from the stored verdict

"""``/sign`` with a v1/v2 event ID that NATS headers would alter (review L4).

nats-py strips header values and turns CR/LF into spaces, so an event ID such as
``$a\\r:x`` reached the filter worker as ``$a :x``: the verdict came back for another ID
(503 for ever) and was stored under that other event's ID. Such IDs are refused as
malformed PDUs before anything is published.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from tests.gateway.policy_harness import SIGN_PATH, Gateway, Origin, StandInWorker, new_room_id


async def test_an_event_id_nats_would_alter_is_bad_json_and_never_judged(
    gateway: Gateway,
    origin: Origin,
    start_worker: Callable[..., Awaitable[StandInWorker]],
    protect_room: Callable[..., Awaitable[str]],
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("1"), "1")
    for event_id in (f"$a\r:{origin.name}", f"$a\n\x00:{origin.name}", f"$a:{origin.name}\x85"):
        event = origin.event(room_id, "1", event_id=event_id)
        r = await gateway.client.post(
            SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
        )
        assert r.status_code == 400, (event_id, r.status_code, r.text)
        assert r.json()["errcode"] == "M_BAD_JSON"
    assert worker.count == 0
    # A space inside would survive a header, but is refused as well (no server makes
    # such IDs); an ordinary ID is judged and signed as usual.
    for event_id, status in ((f"$a b:{origin.name}", 400), (f"$ab:{origin.name}", 200)):
        event = origin.event(room_id, "1", event_id=event_id)
        r = await gateway.client.post(
            SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
        )
        assert r.status_code == status, r.text
    assert worker.count == 1

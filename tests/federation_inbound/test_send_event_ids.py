"""``/send`` in a room of version 1 (review L4): a PDU whose event ID would not survive
use as a NATS header or key gets an error in the answer and is never published."""

from __future__ import annotations

from collections.abc import Callable

from tests.federation_inbound.conftest import InboundGateway, ProtectRoom
from tests.federation_inbound.test_send_transactions import txn
from tests.gateway.policy_harness import Origin, new_room_id
from warden.bus.subjects import HEADER_EVENT_ID


async def test_v1_pdus_with_unsafe_event_ids_are_refused_not_published(
    inbound_gateway: InboundGateway,
    origin: Origin,
    protect_room: ProtectRoom,
    txn_id: Callable[[], str],
) -> None:
    room = await protect_room(new_room_id("1"), "1")
    good = origin.event(room, "1", body="fine", event_id=f"$good:{origin.name}")
    bad_ids = [f"$a b:{origin.name}", f"$a\r\nNats-Msg-Id: $x:{origin.name}", f"$a\t:{origin.name}"]
    bad = [origin.event(room, "1", body="bad", event_id=event_id) for event_id in bad_ids]

    r = await inbound_gateway.send(origin, txn_id(), txn(origin, [good, *bad]))

    assert r.status_code == 200, r.text
    pdus = r.json()["pdus"]
    assert pdus[good["event_id"]] == {}
    for event_id in bad_ids:
        assert "control characters or whitespace" in pdus[event_id]["error"]
    msgs = await inbound_gateway.published.fetch(expect=4)
    assert [m.headers[HEADER_EVENT_ID] for m in msgs] == [good["event_id"]]

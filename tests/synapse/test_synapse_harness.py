"""The end-to-end harness on its own: Synapse starts from its venv, users register,
rooms are created, and federation between Synapse and a local HTTPS homeserver works
both ways (keys fetched directly, transactions delivered, events accepted)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.synapse.second_origin import FederationSigner, SecondOrigin, build_pdu, fetch_pdu
from tests.synapse.synapse_client import MatrixClient, eventually
from tests.synapse.synapse_server import SynapseServer

# The first test also builds Synapse's venv on a fresh machine (a PyPI download).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def origin_signer(
    second_origin: SecondOrigin, e2e_ca_file: str
) -> AsyncIterator[FederationSigner]:
    signer = second_origin.signer(e2e_ca_file)
    try:
        yield signer
    finally:
        await signer.aclose()


async def test_synapse_runs_from_its_own_venv(synapse: SynapseServer) -> None:
    assert synapse.proc.poll() is None
    console = (synapse.workdir / "console.log").read_text(errors="replace")
    assert "Traceback" not in console, console
    # The interpreter Synapse runs with is not the test session's (unless overridden).
    cmdline = Path(f"/proc/{synapse.proc.pid}/cmdline").read_bytes().split(b"\0")

    if not os.environ.get("WARDEN_SYNAPSE_PYTHON"):
        assert cmdline[0].decode() != sys.executable
        assert "synapse-venv" in cmdline[0].decode()


async def test_register_and_create_room(synapse: SynapseServer, alice: MatrixClient) -> None:
    whoami = await alice.request("GET", "/_matrix/client/v3/account/whoami")
    assert whoami.json()["user_id"] == f"@alice:{synapse.server_name}"
    room_id = await alice.create_room(preset="public_chat", name="harness")
    assert room_id.startswith("!")
    assert ":" not in room_id  # room version 12 by default
    sent = await alice.send_message(room_id, "hello from alice")
    assert sent.status_code == 200, sent.text
    bodies = [e["content"].get("body") for e in await alice.messages(room_id)]
    assert "hello from alice" in bodies


async def test_federation_with_a_local_https_homeserver(
    synapse: SynapseServer,
    alice: MatrixClient,
    second_origin: SecondOrigin,
    origin_signer: FederationSigner,
) -> None:
    room_id = await alice.create_room(preset="public_chat", name="federated")
    bob = second_origin.user_id("bob")
    joined = await second_origin.join(
        origin_signer, synapse.federation_url, synapse.server_name, room_id, bob
    )
    assert joined.room_version == "12"
    state_types = {e["type"] for e in joined.response["state"]}
    assert {"m.room.create", "m.room.power_levels", "m.room.join_rules"} <= state_types
    members = await alice.joined_members(room_id)
    assert bob in members

    # Synapse delivers alice's next message to the new member's server.
    sent = await alice.send_message(room_id, "welcome bob")
    assert sent.status_code == 200, sent.text
    alice_event_id = sent.json()["event_id"]

    def delivered() -> bool:
        return any(
            pdu.get("content", {}).get("body") == "welcome bob"
            for txn in second_origin.received
            for pdu in txn.get("pdus", [])
        )

    await eventually(delivered, what="alice's message delivered to the second origin")

    # A message from bob, sent over federation, lands in the room.
    latest = await fetch_pdu(
        origin_signer, synapse.federation_url, synapse.server_name, alice_event_id
    )
    state = {(e["type"], e.get("state_key")): e["event_id"] for e in await alice.state(room_id)}
    event_id, pdu = build_pdu(
        second_origin.name,
        second_origin.key,
        "12",
        {
            "type": "m.room.message",
            "room_id": room_id,
            "sender": bob,
            "content": {"msgtype": "m.text", "body": "hi from bob"},
            "depth": latest["depth"] + 1,
            "prev_events": [alice_event_id],
            "auth_events": [state[("m.room.power_levels", "")], state[("m.room.member", bob)]],
        },
    )
    response = await second_origin.send_transaction(
        origin_signer, synapse.federation_url, synapse.server_name, [pdu]
    )
    assert response.status_code == 200, response.text
    assert response.json()["pdus"] == {event_id: {}}

    async def visible() -> dict[str, Any] | None:
        seen = await alice.event(room_id, event_id)
        return seen.json() if seen.status_code == 200 else None

    # Synapse answers the transaction before the event is persisted.
    event = await eventually(visible, what="bob's message visible to alice")
    assert event["content"]["body"] == "hi from bob"
    assert event["sender"] == bob

"""Warden against a real Synapse, end to end: issue 4's six scenarios (1-6), plus an
event that reaches only Warden over ``/send`` (4b) and joining again after a leave and
a kick (7).

One Synapse (from its own venv), one Warden stack (gateway with its own TLS, a filter
worker, the moderator) and one second homeserver of the tests' own are shared by the
module; the tests run in order and build on each other (``Scenario`` carries the rooms).

Every party is on loopback and named by an IP literal with a port, so no lookup is made:
Synapse ``127.0.0.1:<p1>``, Warden ``127.0.0.1:<p2>``, the second origin
``127.0.0.1:<p3>``. Certificates come from one test CA.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme

from tests.gateway.policy_harness import synapse_verifies
from tests.synapse.second_origin import FederationSigner, SecondOrigin, build_pdu, fetch_pdu
from tests.synapse.synapse_client import MatrixClient, eventually, q
from tests.synapse.synapse_server import SynapseServer
from tests.synapse.warden_stack import WardenStack, room_report, start_warden, verdict_of
from warden.matrix.keys import POLICY_SERVER_KEY_ID, verify_key_base64
from warden_gateway.policy_api import REFUSED_MESSAGE

# The first test also builds Synapse's venv on a fresh machine (a PyPI download).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

KEYWORD = "buy-cheap-pills"
FEDERATION_WAIT = 60.0


@dataclass
class Scenario:
    """What one test leaves for the next."""

    community_id: str = ""
    policy_key: str = ""
    public_room: str = ""
    private_room: str = ""
    warden_left: bool = False


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario()


@pytest.fixture(scope="module")
def moderator_token(synapse: SynapseServer) -> str:
    """The access token of ``@mod``, Warden's moderator account on Synapse."""
    return synapse.register("mod").access_token


@pytest.fixture(scope="module")
def warden(
    synapse: SynapseServer,
    moderator_token: str,
    pg_database: str,
    e2e_ca: trustme.CA,
    e2e_ca_file: str,
    e2e_dir: Path,
) -> Iterator[WardenStack]:
    """Warden's gateway, a filter worker and the moderator, named ``127.0.0.1:<port>``."""
    stack = start_warden(
        e2e_dir / "warden",
        database_url=pg_database,
        ca=e2e_ca,
        ca_file=e2e_ca_file,
        join_server=synapse.server_name,
        moderator_tokens=f"{synapse.client_url}:{moderator_token}",
    )
    try:
        yield stack
    finally:
        codes = stack.stop()
        assert all(code == 0 for code in codes.values()), f"{codes}\n{stack.logs()[-20000:]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mod(synapse: SynapseServer, moderator_token: str) -> AsyncIterator[MatrixClient]:
    client = MatrixClient(synapse.client_url, moderator_token, synapse.user_id("mod"))
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def warden_signer(warden: WardenStack) -> AsyncIterator[FederationSigner]:
    """Federation requests signed as Warden (to read events as Synapse stores them)."""
    signer = FederationSigner(warden.name, warden.federation_key, warden.ca_file)
    try:
        yield signer
    finally:
        await signer.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def origin_signer(
    second_origin: SecondOrigin, e2e_ca_file: str
) -> AsyncIterator[FederationSigner]:
    signer = second_origin.signer(e2e_ca_file)
    try:
        yield signer
    finally:
        await signer.aclose()


def room_power(alice: MatrixClient, mod: MatrixClient) -> dict[str, Any]:
    """createRoom power levels: mod may redact (alice, the creator, has infinite power in
    room version 12 and must not be listed)."""
    return {"users": {mod.user_id: 50}}


async def set_policy(client: MatrixClient, room_id: str, warden: WardenStack, key: str) -> None:
    """Point the room's ``m.room.policy`` at Warden with its policy key."""
    response = await client.set_state(
        room_id, "m.room.policy", {"via": warden.name, "public_keys": {"ed25519": key}}
    )
    assert response.status_code == 200, response.text


async def wait_uses_warden(warden: WardenStack, room_id: str) -> dict[str, Any]:
    """Wait until Warden's room report says the room names Warden with its current key."""

    async def probe() -> dict[str, Any] | None:
        report = await room_report(warden, room_id)
        policy = (report or {}).get("policy_server") or {}
        return report if policy.get("uses_warden") and policy.get("key_matches") else None

    report: dict[str, Any] = await eventually(
        probe, timeout=FEDERATION_WAIT, what="Warden learning the room's m.room.policy"
    )
    return report


async def assert_signed_by_warden(
    synapse: SynapseServer, signer: FederationSigner, warden: WardenStack, event_id: str
) -> dict[str, Any]:
    """Fetch the PDU Synapse stored and check Warden's ed25519:policy_server signature."""
    pdu = await fetch_pdu(signer, synapse.federation_url, synapse.server_name, event_id)
    signature = pdu.get("signatures", {}).get(warden.name, {}).get(POLICY_SERVER_KEY_ID)
    assert signature, f"no Warden signature on the stored event: {pdu.get('signatures')}"
    assert synapse_verifies("12", pdu, warden.name, signature, warden.policy_key)
    return pdu


def bodies(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("content", {}).get("body")) for e in events if e["type"] == "m.room.message"]


# --------------------------------------------------------------------------------------
# 1. Warden joins a public room through the admin API; the room names it in m.room.policy
# --------------------------------------------------------------------------------------


async def test_1_warden_joins_a_public_room(
    synapse: SynapseServer,
    warden: WardenStack,
    alice: MatrixClient,
    mod: MatrixClient,
    scenario: Scenario,
) -> None:
    async with warden.admin_client() as admin:
        created = await admin.post(
            "/communities/new",
            json={"name": "end to end"},
        )
        assert created.status_code == 200, created.text
        scenario.community_id = created.json()["community_id"]
        configured = await admin.patch(
            f"/communities/{scenario.community_id}",
            json={
                "config": {"keyword_filter_keywords": [KEYWORD], "hellban_postfilter_minutes": 0}
            },
        )
        assert configured.status_code == 200, configured.text

    room_id = await alice.create_room(
        preset="public_chat", name="e2e public", power_level_content_override=room_power(alice, mod)
    )
    await mod.join(room_id)

    async with warden.admin_client() as admin:
        joined = await admin.post(
            f"/rooms/{q(room_id)}/join", json={"community_id": scenario.community_id}
        )
        assert joined.status_code == 200, (
            f"{joined.status_code} {joined.text}\n{warden.logs()[-8000:]}"
        )
        room = joined.json()
        assert room["room_id"] == room_id
        assert room["community_id"] == scenario.community_id
        assert room["room_version"] == "12"
        moderated = await admin.post(
            "/set_room_moderator", json={"room_id": room_id, "moderator_user_id": mod.user_id}
        )
        assert moderated.status_code == 200, moderated.text

    members = await alice.joined_members(room_id)
    assert warden.user_id in members, members

    async with warden.public_client() as public:
        well_known = await public.get("/.well-known/matrix/policy_server")
    assert well_known.status_code == 200
    key = well_known.json()["public_keys"]["ed25519"]
    assert key == verify_key_base64(warden.policy_key)
    await set_policy(alice, room_id, warden, key)

    report = await wait_uses_warden(warden, room_id)
    assert report["policy_server"] == {
        "uses_warden": True,
        "via": warden.name,
        "public_key": key,
        "key_matches": True,
    }
    scenario.policy_key, scenario.public_room = key, room_id


# --------------------------------------------------------------------------------------
# 2. A neutral message is accepted and carries Warden's valid signature
# --------------------------------------------------------------------------------------


async def test_2_neutral_message_is_signed_by_warden(
    synapse: SynapseServer,
    warden: WardenStack,
    warden_signer: FederationSigner,
    alice: MatrixClient,
    scenario: Scenario,
) -> None:
    assert scenario.public_room, "scenario 1 did not complete"
    sent = await alice.send_message(scenario.public_room, "hello, world")
    assert sent.status_code == 200, f"{sent.status_code} {sent.text}"
    event_id = sent.json()["event_id"]

    pdu = await assert_signed_by_warden(synapse, warden_signer, warden, event_id)
    assert pdu["content"]["body"] == "hello, world"
    verdict = await verdict_of(warden, event_id)
    assert verdict is not None
    assert verdict["class"] == "neutral"
    assert verdict["origin"] == synapse.server_name
    assert verdict["community_id"] == scenario.community_id
    # Synapse's log shows its /sign request to Warden and the 200.
    assert synapse.log_lines(warden.name, "/_matrix/policy/v1/sign", "200")


# --------------------------------------------------------------------------------------
# 3. A message that trips a filter is refused with Warden's own error
# --------------------------------------------------------------------------------------


async def test_3_filtered_message_is_refused(
    synapse: SynapseServer, warden: WardenStack, alice: MatrixClient, scenario: Scenario
) -> None:
    assert scenario.public_room, "scenario 1 did not complete"
    body = f"great deal: {KEYWORD} today"
    sent = await alice.send_message(scenario.public_room, body)
    assert sent.status_code == 400, f"{sent.status_code} {sent.text}"
    error = sent.json()
    assert error["errcode"] == "M_FORBIDDEN"
    assert error["error"] == REFUSED_MESSAGE
    assert body not in bodies(await alice.messages(scenario.public_room))
    assert synapse.log_lines(warden.name, "/_matrix/policy/v1/sign", "400")
    # The neutral message of scenario 2 is still there.
    assert "hello, world" in bodies(await alice.messages(scenario.public_room))


# --------------------------------------------------------------------------------------
# 4. An event sent over federation without asking Warden is soft-failed and redacted
# --------------------------------------------------------------------------------------


async def _origin_message(
    origin: SecondOrigin,
    signer: FederationSigner,
    synapse: SynapseServer,
    alice: MatrixClient,
    room_id: str,
    sender: str,
    body: str,
) -> tuple[str, dict[str, Any]]:
    """A message PDU from the second origin on top of the room's latest event."""
    latest_id = (await alice.messages(room_id, limit=1))[0]["event_id"]
    latest = await fetch_pdu(signer, synapse.federation_url, synapse.server_name, latest_id)
    state = {(e["type"], e.get("state_key")): e["event_id"] for e in await alice.state(room_id)}
    return build_pdu(
        origin.name,
        origin.key,
        "12",
        {
            "type": "m.room.message",
            "room_id": room_id,
            "sender": sender,
            "content": {"msgtype": "m.text", "body": body},
            "depth": latest["depth"] + 1,
            "prev_events": [latest_id],
            "auth_events": [state[("m.room.power_levels", "")], state[("m.room.member", sender)]],
        },
    )


async def test_4_unsigned_federated_event_is_soft_failed_and_redacted(
    synapse: SynapseServer,
    warden: WardenStack,
    alice: MatrixClient,
    mod: MatrixClient,
    second_origin: SecondOrigin,
    origin_signer: FederationSigner,
    scenario: Scenario,
) -> None:
    room_id = scenario.public_room
    assert room_id, "scenario 1 did not complete"
    bob = second_origin.user_id("bob")
    await second_origin.join(
        origin_signer, synapse.federation_url, synapse.server_name, room_id, bob
    )
    assert bob in await alice.joined_members(room_id)

    # A neutral message without Warden's signature: Synapse asks Warden, which signs.
    ok_id, ok_pdu = await _origin_message(
        second_origin, origin_signer, synapse, alice, room_id, bob, "hi from the other server"
    )
    sent = await second_origin.send_transaction(
        origin_signer, synapse.federation_url, synapse.server_name, [ok_pdu]
    )
    assert sent.status_code == 200, sent.text
    assert sent.json()["pdus"] == {ok_id: {}}

    async def visible() -> Any:
        response = await alice.event(room_id, ok_id)
        return response.json() if response.status_code == 200 else None

    seen = await eventually(visible, timeout=FEDERATION_WAIT, what="bob's neutral message visible")
    assert seen["content"]["body"] == "hi from the other server"
    ok_verdict = await verdict_of(warden, ok_id)
    assert ok_verdict is not None and ok_verdict["class"] == "neutral"
    # Synapse stored the signature it got and passes it on.
    await assert_signed_by_warden(synapse, origin_signer, warden, ok_id)

    # A message that trips the keyword filter, sent without asking Warden.
    spam_body = f"{KEYWORD} from afar"
    spam_id, spam_pdu = await _origin_message(
        second_origin, origin_signer, synapse, alice, room_id, bob, spam_body
    )
    sent = await second_origin.send_transaction(
        origin_signer, synapse.federation_url, synapse.server_name, [spam_pdu]
    )
    assert sent.status_code == 200, sent.text
    # Soft-failing is not rejecting: the transaction answer has no error for it.
    assert sent.json()["pdus"] == {spam_id: {}}

    async def judged() -> Any:
        return await verdict_of(warden, spam_id)

    verdict = await eventually(judged, timeout=FEDERATION_WAIT, what="Warden's verdict on the spam")
    assert verdict["class"] == "prohibited"
    assert verdict["origin"] == synapse.server_name
    assert verdict["sender"] == bob

    # Synapse asked Warden (and got 400) while processing the PDU, then soft-failed it.
    await eventually(
        lambda: synapse.log_lines(warden.name, "/_matrix/policy/v1/sign", "400"),
        what="Synapse's refused /sign call in its log",
    )

    # The moderator redacts it with the moderator account.
    async def redaction() -> Any:
        for event in await alice.messages(room_id):
            redacts = event.get("redacts") or event.get("content", {}).get("redacts")
            if event["type"] == "m.room.redaction" and redacts == spam_id:
                return event
        return None

    redacted = await eventually(
        redaction, timeout=FEDERATION_WAIT, what="the moderator's redaction"
    )
    assert redacted["sender"] == mod.user_id
    # Soft-failed: never in the room's timeline.
    assert spam_body not in bodies(await alice.messages(room_id))


async def test_4b_event_sent_only_to_warden_is_judged_and_redacted(
    synapse: SynapseServer,
    warden: WardenStack,
    alice: MatrixClient,
    mod: MatrixClient,
    second_origin: SecondOrigin,
    origin_signer: FederationSigner,
    scenario: Scenario,
) -> None:
    """An unsigned event reaching Warden over its own ``/send`` (bypassing the policy
    server) is judged like a ``/sign`` request, and the moderator redacts it on Synapse."""
    room_id = scenario.public_room
    assert room_id, "scenario 1 did not complete"
    bob = second_origin.user_id("bob")
    assert bob in await alice.joined_members(room_id), "scenario 4 did not complete"
    body = f"{KEYWORD} straight to the policy server"
    event_id, pdu = await _origin_message(
        second_origin, origin_signer, synapse, alice, room_id, bob, body
    )
    sent = await second_origin.send_transaction(origin_signer, warden.url, warden.name, [pdu])
    assert sent.status_code == 200, f"{sent.status_code} {sent.text}"
    assert sent.json() == {"pdus": {event_id: {}}}

    async def judged() -> Any:
        return await verdict_of(warden, event_id)

    verdict = await eventually(judged, timeout=FEDERATION_WAIT, what="Warden's verdict from /send")
    assert verdict["class"] == "prohibited"
    assert verdict["origin"] == warden.name
    assert verdict["sender"] == bob

    # Synapse does not serve a redaction of an event it does not have, but sends it to
    # every server in the room: the second origin receives it.
    def redaction_pdu() -> Any:
        for txn in second_origin.received:
            for received in txn.get("pdus", []):
                redacts = received.get("redacts") or received.get("content", {}).get("redacts")
                if received.get("type") == "m.room.redaction" and redacts == event_id:
                    return received
        return None

    redaction = await eventually(
        redaction_pdu,
        timeout=FEDERATION_WAIT,
        what="the moderator's redaction sent over federation",
    )
    assert redaction["sender"] == mod.user_id

    # When the event reaches Synapse after all, Synapse asks Warden, which refuses again
    # (one verdict per event), and the redaction now applies: the body never shows.
    sent = await second_origin.send_transaction(
        origin_signer, synapse.federation_url, synapse.server_name, [pdu]
    )
    assert sent.status_code == 200, sent.text

    async def redaction_visible() -> Any:
        for event in await alice.messages(room_id):
            redacts = event.get("redacts") or event.get("content", {}).get("redacts")
            if event["type"] == "m.room.redaction" and redacts == event_id:
                return event
        return None

    await eventually(redaction_visible, timeout=FEDERATION_WAIT, what="the redaction served")
    assert body not in bodies(await alice.messages(room_id))
    assert (await verdict_of(warden, event_id) or {}).get("class") == "prohibited"


# --------------------------------------------------------------------------------------
# 5. An invite-only room: Warden is invited, accepts, joins and protects it
# --------------------------------------------------------------------------------------


async def test_5_invite_only_room(
    synapse: SynapseServer,
    warden: WardenStack,
    warden_signer: FederationSigner,
    alice: MatrixClient,
    mod: MatrixClient,
    scenario: Scenario,
) -> None:
    assert scenario.community_id and scenario.policy_key, "scenario 1 did not complete"

    # Not approved: Warden refuses the invite and Synapse tells alice.
    unapproved = await alice.create_room(preset="private_chat", name="e2e unapproved")
    refused = await alice.invite(unapproved, warden.user_id)
    assert refused.status_code == 403, f"{refused.status_code} {refused.text}"
    assert refused.json()["errcode"] == "M_FORBIDDEN"

    room_id = await alice.create_room(
        preset="private_chat",
        name="e2e private",
        power_level_content_override=room_power(alice, mod),
    )
    assert (await alice.invite(room_id, mod.user_id)).status_code == 200
    await mod.join(room_id)
    async with warden.admin_client() as admin:
        approved = await admin.post(
            f"/rooms/{q(room_id)}/approve_invite", json={"community_id": scenario.community_id}
        )
        assert approved.status_code == 200, approved.text

    invited = await alice.invite(room_id, warden.user_id)
    assert invited.status_code == 200, f"{invited.status_code} {invited.text}"

    async def joined() -> bool:
        return warden.user_id in await alice.joined_members(room_id)

    await eventually(joined, timeout=FEDERATION_WAIT, what="Warden joining the invite-only room")
    report = await eventually(
        lambda: room_report(warden, room_id), what="Warden protecting the invite-only room"
    )
    assert report["community_id"] == scenario.community_id
    async with warden.admin_client() as admin:
        moderated = await admin.post(
            "/set_room_moderator", json={"room_id": room_id, "moderator_user_id": mod.user_id}
        )
        assert moderated.status_code == 200, moderated.text

    await set_policy(alice, room_id, warden, scenario.policy_key)
    await wait_uses_warden(warden, room_id)

    refused_msg = await alice.send_message(room_id, f"private {KEYWORD}")
    assert refused_msg.status_code == 400, f"{refused_msg.status_code} {refused_msg.text}"
    assert refused_msg.json()["errcode"] == "M_FORBIDDEN"
    assert refused_msg.json()["error"] == REFUSED_MESSAGE
    ok = await alice.send_message(room_id, "private hello")
    assert ok.status_code == 200, ok.text
    await assert_signed_by_warden(synapse, warden_signer, warden, ok.json()["event_id"])
    scenario.private_room = room_id


# --------------------------------------------------------------------------------------
# 6. Warden leaves; Synapse stops asking it and messages flow without it
# --------------------------------------------------------------------------------------


async def test_6_warden_leaves(
    synapse: SynapseServer,
    warden: WardenStack,
    origin_signer: FederationSigner,
    alice: MatrixClient,
    scenario: Scenario,
) -> None:
    room_id = scenario.public_room
    assert room_id, "scenario 1 did not complete"
    async with warden.admin_client() as admin:
        left = await admin.post(f"/rooms/{q(room_id)}/leave", json={})
        assert left.status_code == 200, f"{left.status_code} {left.text}"
        assert left.json() == {}

    async def gone() -> bool:
        return warden.user_id not in await alice.joined_members(room_id)

    await eventually(gone, what="Warden's leave reaching Synapse")
    assert await room_report(warden, room_id) is None

    # m.room.policy still names Warden, but it has no joined member: Synapse asks nobody.
    body = f"after the policy server left: {KEYWORD}"
    sent = await alice.send_message(room_id, body)
    assert sent.status_code == 200, f"{sent.status_code} {sent.text}"
    event_id = sent.json()["event_id"]
    assert body in bodies(await alice.messages(room_id))
    assert await verdict_of(warden, event_id) is None
    # Read as the second origin (still in the room; Warden no longer is).
    pdu = await fetch_pdu(origin_signer, synapse.federation_url, synapse.server_name, event_id)
    assert warden.name not in pdu.get("signatures", {})

    # Removing m.room.policy turns the policy server off for good; messages still flow.
    cleared = await alice.set_state(room_id, "m.room.policy", {})
    assert cleared.status_code == 200, cleared.text
    after = await alice.send_message(room_id, "plain message, no policy server")
    assert after.status_code == 200, after.text
    scenario.warden_left = True


# --------------------------------------------------------------------------------------
# 7. Joining again: after leaving, and after being kicked
# --------------------------------------------------------------------------------------


async def test_7_rejoin_after_leaving_and_after_a_kick(
    synapse: SynapseServer, warden: WardenStack, alice: MatrixClient, scenario: Scenario
) -> None:
    room_id = scenario.public_room
    assert scenario.warden_left, "scenario 6 did not complete"

    async def join_again() -> None:
        async with warden.admin_client() as admin:
            joined = await admin.post(
                f"/rooms/{q(room_id)}/join", json={"community_id": scenario.community_id}
            )
        assert joined.status_code == 200, f"{joined.status_code} {joined.text}"
        assert warden.user_id in await alice.joined_members(room_id)

    async def refused_again() -> None:
        sent = await alice.send_message(room_id, f"again: {KEYWORD}")
        assert sent.status_code == 400, f"{sent.status_code} {sent.text}"
        assert sent.json()["error"] == REFUSED_MESSAGE

    await join_again()
    await set_policy(alice, room_id, warden, scenario.policy_key)
    await wait_uses_warden(warden, room_id)
    await refused_again()

    # alice kicks Warden (a local membership change: Synapse asks no policy server).
    kicked = await alice.request(
        "POST",
        f"/_matrix/client/v3/rooms/{q(room_id)}/kick",
        json={"user_id": warden.user_id, "reason": "testing a rejoin"},
    )
    assert kicked.status_code == 200, kicked.text
    assert warden.user_id not in await alice.joined_members(room_id)
    through = await alice.send_message(room_id, f"while kicked: {KEYWORD}")
    assert through.status_code == 200, through.text

    await join_again()
    await refused_again()


async def test_rooms_were_given_the_policy_key(warden: WardenStack, scenario: Scenario) -> None:
    """The key rooms were given is the policy key, never the federation key."""
    assert scenario.policy_key == verify_key_base64(warden.policy_key)
    assert scenario.policy_key != verify_key_base64(warden.federation_key)

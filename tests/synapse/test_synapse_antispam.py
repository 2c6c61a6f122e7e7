"""Synapse with ``synapse-http-antispam`` (from PyPI, in Synapse's venv) pointed at
Warden's ``/_warden/antispam/v1``: Warden is the homeserver's spam checker.

Synapse's homeserver is a Warden community (keywords, a policy list banning
``@spammer``) whose token Synapse reads from a file. Local messages, invites and joins
are judged by Warden (a join is refused when the list bans the user, or the user's
server); with Warden's gateway stopped, each callback follows its ``fail_open``
setting.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import trustme
from unpaddedbase64 import encode_base64

from tests.service_processes import free_port
from tests.synapse.synapse_client import MatrixClient, eventually, q
from tests.synapse.synapse_server import SynapseServer, start_synapse
from tests.synapse.warden_stack import WardenStack, start_warden
from warden.policy.harms import HARMS_FIELD, OTHER, SPAM
from warden.storage import communities, community_tokens, room_state, rooms

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

# user_may_create_room_alias through Warden's module file (deploy/synapse): the module
# itself, 0.5.1, cannot encode the RoomAlias object Synapse passes it.
CALLBACKS = [
    "check_event_for_spam",
    "user_may_invite",
    "user_may_join_room",
    "user_may_create_room_alias",
]
MODULE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "synapse"


class Setup:
    """What the module's Synapse and Warden share: the gateway's port, the token file."""

    def __init__(self, port: int, token_path: Path, list_room: str) -> None:
        self.port = port
        self.token_path = token_path
        self.list_room = list_room


@pytest.fixture(scope="module")
def setup(pg_database: str, e2e_dir: Path) -> Setup:
    """The homeserver's community, its token and its policy list, straight in PostgreSQL
    (Synapse reads the token when it starts, before Warden runs)."""
    port = free_port()
    server_pattern = "@spammer:*"
    list_room = "!" + encode_base64(os.urandom(18), urlsafe=True)

    async def create() -> str:
        pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=2)
        try:
            community = await communities.create_community(pool, "Synapse homeserver")
            config = {
                "keyword_filter_keywords": ["buy now", "casino"],
                "policy_list_room_ids": [list_room],
            }
            await communities.update_community(pool, community.community_id, config=config)
            await rooms.put_room(pool, list_room, "12", community.community_id)
            ban = {
                "type": "m.policy.rule.user",
                "state_key": "spammer",
                "sender": "@mod:lists.example",
                "room_id": list_room,
                "content": {"entity": server_pattern, "recommendation": "m.ban", "reason": "x"},
                "origin_server_ts": 1,
                "depth": 5,
                "auth_events": [],
                "prev_events": [],
                "hashes": {"sha256": "x"},
                "signatures": {},
            }
            await room_state.apply_event(pool, list_room, ban, "$ban-spammer")
            rotation = await community_tokens.rotate_access_token(pool, community.community_id)
            assert rotation is not None
            return rotation.new_access_token
        finally:
            await pool.close()

    token_path = e2e_dir / "warden-antispam.token"
    token_path.write_text(asyncio.run(create()) + "\n")
    return Setup(port, token_path, list_room)


@pytest.fixture(scope="module")
def synapse(
    synapse_python: Path, e2e_ca: trustme.CA, e2e_dir: Path, e2e_ca_file: str, setup: Setup
) -> Iterator[SynapseServer]:
    """Synapse with the antispam module; it trusts the test CA (Warden's HTTPS)."""
    module = {
        "module": "warden_http_antispam.HTTPAntispam",
        "config": {
            "base_url": f"https://127.0.0.1:{setup.port}/_warden/antispam/v1",
            "authorization_path": str(setup.token_path),
            "enabled_callbacks": CALLBACKS,
            "fail_open": {
                "check_event_for_spam": True,
                "user_may_invite": False,
                "user_may_join_room": False,
                "user_may_create_room_alias": False,
            },
            "do_ping": True,
        },
    }
    server = start_synapse(
        synapse_python,
        e2e_dir / "synapse",
        e2e_ca,
        modules=[module],
        extra_env={"SSL_CERT_FILE": e2e_ca_file, "PYTHONPATH": str(MODULE_DIR)},
    )
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"Synapse exited with {code}:\n{server.log()[-5000:]}"


@pytest.fixture(scope="module")
def warden(
    synapse: SynapseServer,
    pg_database: str,
    e2e_ca: trustme.CA,
    e2e_ca_file: str,
    e2e_dir: Path,
    setup: Setup,
) -> Iterator[WardenStack]:
    """Warden's gateway (on the port Synapse's module calls), a worker, the moderator."""
    stack = start_warden(
        e2e_dir / "warden",
        database_url=pg_database,
        ca=e2e_ca,
        ca_file=e2e_ca_file,
        join_server=synapse.server_name,
        moderator_tokens=f"{synapse.client_url}:{synapse.register('mod').access_token}",
        port=setup.port,
    )
    try:
        yield stack
    finally:
        stack.stop()


async def user(synapse: SynapseServer, localpart: str) -> MatrixClient:
    registered = synapse.users.get(localpart) or synapse.register(localpart)
    return MatrixClient(synapse.client_url, registered.access_token, registered.user_id)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(
    synapse: SynapseServer, warden: WardenStack
) -> AsyncIterator[dict[str, MatrixClient]]:
    made = {name: await user(synapse, name) for name in ("alice", "bob", "eve", "spammer")}
    try:
        yield made
    finally:
        for client in made.values():
            await client.aclose()


def assert_refused(response: Any, errcode: str) -> dict[str, Any]:
    assert response.status_code == 403, response.text
    body: dict[str, Any] = response.json()
    assert body["errcode"] == errcode, body
    return body


async def test_the_module_pings_warden(synapse: SynapseServer, warden: WardenStack) -> None:
    async def pinged() -> bool:
        return bool(synapse.log_lines("Successfully pinged antispam server"))

    await eventually(pinged, timeout=30)


async def test_a_local_message_with_a_keyword_is_refused_to_the_client(
    synapse: SynapseServer, warden: WardenStack, clients: dict[str, MatrixClient]
) -> None:
    eve = clients["eve"]
    room_id = await eve.create_room(preset="public_chat", name="eve's room")
    ok = await eve.send_message(room_id, "hello everyone")
    assert ok.status_code == 200, ok.text
    refused = await eve.send_message(room_id, "please buy now, cheap")
    body = assert_refused(refused, "M_FORBIDDEN")
    assert body["harms"] == body[HARMS_FIELD] == [SPAM]
    bodies = [e["content"].get("body") for e in await eve.messages(room_id)]
    assert "hello everyone" in bodies and "please buy now, cheap" not in bodies
    # Recorded as a verdict, and counted by callback and outcome.
    assert warden.log_lines("antispam: refused", "check_event_for_spam")


async def test_invites_and_joins(
    synapse: SynapseServer, warden: WardenStack, clients: dict[str, MatrixClient]
) -> None:
    alice, bob, spammer = clients["alice"], clients["bob"], clients["spammer"]
    room_id = await alice.create_room(preset="public_chat", name="alice's room")
    assert_refused(await alice.invite(room_id, spammer.user_id), "M_FORBIDDEN")
    invited = await alice.invite(room_id, bob.user_id)
    assert invited.status_code == 200, invited.text

    joined = await bob.request("POST", f"/_matrix/client/v3/join/{q(room_id)}", json={})
    assert joined.status_code == 200, joined.text
    refused = await spammer.request("POST", f"/_matrix/client/v3/join/{q(room_id)}", json={})
    assert_refused(refused, "M_FORBIDDEN")
    assert spammer.user_id not in await alice.joined_members(room_id)


async def test_a_join_by_a_user_of_a_banned_server_is_refused(
    synapse: SynapseServer,
    warden: WardenStack,
    clients: dict[str, MatrixClient],
    setup: Setup,
    pg_database: str,
    e2e_ca_file: str,
) -> None:
    """The list bans Synapse's own server (the only server whose users Synapse asks
    about): a local user's join is refused through ``user_may_join_room``. The rule is
    removed at the end, so it bans nothing else of this module."""
    alice, carol = clients["alice"], await user(synapse, "carol")
    room_id = await alice.create_room(preset="public_chat", name="no banned servers")
    pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=2)
    ban = {
        "type": "m.policy.rule.server",
        "state_key": "synapse-server",
        "sender": "@mod:lists.example",
        "room_id": setup.list_room,
        "content": {"entity": synapse.server_name, "recommendation": "m.ban", "reason": "x"},
        "origin_server_ts": 1,
        "depth": 6,
        "auth_events": [],
        "prev_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }
    token = setup.token_path.read_text().strip()
    warden_api = httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{setup.port}/_warden/antispam/v1",
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=e2e_ca_file),
    )
    try:
        await room_state.apply_event(pool, setup.list_room, ban, "$ban-synapse-server")

        # The worker caches a list's rules for a few seconds: wait until Warden itself
        # refuses the join, asked directly, before Synapse asks it.
        async def refused_by_warden() -> bool:
            r = await warden_api.post(
                "/user_may_join_room",
                json={"user": carol.user_id, "room": room_id, "is_invited": False},
            )
            return r.status_code == 403

        await eventually(refused_by_warden, timeout=30, what="the server ban in effect")
        joined = await carol.request("POST", f"/_matrix/client/v3/join/{q(room_id)}", json={})
        body = assert_refused(joined, "M_FORBIDDEN")
        assert body["harms"] == body[HARMS_FIELD] == [OTHER], body
        assert carol.user_id not in await alice.joined_members(room_id)
        assert warden.log_lines("antispam: refused", "user_may_join_room")
    finally:
        await pool.execute(
            "DELETE FROM room_state_events WHERE room_id = $1 AND state_key = 'synapse-server'",
            setup.list_room,
        )
        await pool.close()
        await warden_api.aclose()
        await carol.aclose()


async def test_a_room_alias_with_a_keyword_is_refused(
    synapse: SynapseServer, warden: WardenStack, clients: dict[str, MatrixClient]
) -> None:
    """The alias reaches Warden as a string (warden_http_antispam) and is judged by the
    text filters: a keyword is refused with Warden's errcode, another alias is made."""
    alice = clients["alice"]
    room_id = await alice.create_room(preset="public_chat", name="aliases")
    server = alice.user_id.partition(":")[2]
    good = f"#good-room-{os.urandom(3).hex()}:{server}"
    made = await alice.request(
        "PUT", f"/_matrix/client/v3/directory/room/{q(good)}", json={"room_id": room_id}
    )
    assert made.status_code == 200, made.text
    bad = f"#casino-deals-{os.urandom(3).hex()}:{server}"
    refused = await alice.request(
        "PUT", f"/_matrix/client/v3/directory/room/{q(bad)}", json={"room_id": room_id}
    )
    body = assert_refused(refused, "M_FORBIDDEN")
    assert body[HARMS_FIELD] == [SPAM], body
    assert warden.log_lines("antispam: refused", "user_may_create_room_alias")
    missing = await alice.request("GET", f"/_matrix/client/v3/directory/room/{q(bad)}")
    assert missing.status_code == 404, missing.text


async def test_with_warden_stopped_each_callback_follows_its_fail_mode(
    synapse: SynapseServer, warden: WardenStack, clients: dict[str, MatrixClient]
) -> None:
    alice = clients["alice"]
    room_id = await alice.create_room(preset="public_chat", name="outage")
    gateway = next(s for s in warden.services if s.name == "gateway")
    assert gateway.stop() == 0
    # check_event_for_spam fails open: the message goes through unjudged.
    sent = await alice.send_message(room_id, "buy now while Warden is down")
    assert sent.status_code == 200, sent.text
    # user_may_invite fails closed: M_UNKNOWN.
    assert_refused(await alice.invite(room_id, clients["bob"].user_id), "M_UNKNOWN")

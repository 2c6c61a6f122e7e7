"""Redaction commands to a moderation bot on a real Synapse (reference §2.3).

A Warden stack (gateway, filter worker, moderator) and one Synapse: a community names
``@bot`` on Synapse as its ``moderation_bot_user_id``; a prohibited verdict of that
community, published as the filter worker publishes it, makes the moderator send a
signed ``org.matrix.policyserv.command`` to-device EDU to Synapse over federation
``/send``. Synapse authenticates the transaction (fetching Warden's key from the
gateway), accepts it, and hands the command to the bot's device, where ``/sync`` shows
it with a signature that verifies with Warden's policy key.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
import trustme
from signedjson.key import get_verify_key
from signedjson.sign import verify_signed_json

from tests.conftest import NATS_URL
from tests.moderator.verdict_stream import prohibited_verdict
from tests.synapse.synapse_client import MatrixClient, eventually
from tests.synapse.synapse_server import SynapseServer
from tests.synapse.warden_stack import WardenStack, start_warden
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import verdict_subject
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.policy.config import validate_community_config
from warden.storage import communities

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

COMMAND_TYPE = "org.matrix.policyserv.command"


@pytest.fixture(scope="module")
def warden(
    synapse: SynapseServer,
    pg_database: str,
    e2e_ca: trustme.CA,
    e2e_ca_file: str,
    e2e_dir: Path,
) -> Iterator[WardenStack]:
    stack = start_warden(
        e2e_dir / "warden",
        database_url=pg_database,
        ca=e2e_ca,
        ca_file=e2e_ca_file,
        join_server=synapse.server_name,
        moderator_tokens="",
        extra_env={"PS_MODERATION_COMMAND_POLL_SECONDS": "0.5"},
    )
    try:
        yield stack
    finally:
        codes = stack.stop()
        assert all(code == 0 for code in codes.values()), f"{codes}\n{stack.logs()[-20000:]}"


async def sync_token(client: MatrixClient) -> str:
    """The bot's first ``/sync``: where later syncs start."""
    response = await client.request("GET", "/_matrix/client/v3/sync", params={"timeout": 0})
    assert response.status_code == 200, response.text
    token: str = response.json()["next_batch"]
    return token


async def test_synapse_accepts_the_command_and_the_bot_receives_it(
    synapse: SynapseServer, warden: WardenStack, pg_database: str
) -> None:
    bot = synapse.register("bot")
    client = MatrixClient(synapse.client_url, bot.access_token, bot.user_id)
    try:
        since = await sync_token(client)

        pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=1)
        try:
            community = await communities.create_community(pool, "bot community")
            config = validate_community_config({"moderation_bot_user_id": bot.user_id})
            await communities.update_community(pool, community.community_id, config=config)
        finally:
            await pool.close()

        verdict = prohibited_verdict(
            f"!{uuid.uuid4().hex[:12]}:{synapse.server_name}",
            community_id=community.community_id,
        )
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            await ensure_verdicts_stream(js)
            await js.publish(
                verdict_subject("prohibited"),
                verdict.to_json(),
                headers={"Nats-Msg-Id": verdict.event_id},
            )
        finally:
            await nc.close()

        async def to_device() -> list[dict[str, Any]]:
            nonlocal since
            response = await client.request(
                "GET", "/_matrix/client/v3/sync", params={"timeout": 1000, "since": since}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            since = body["next_batch"]
            events: list[dict[str, Any]] = body.get("to_device", {}).get("events", [])
            return [e for e in events if e.get("type") == COMMAND_TYPE]

        (event,) = await eventually(to_device, timeout=120, what="the command at the bot")
    finally:
        await client.aclose()

    assert event["sender"] == f"@policyserv:{warden.name}"
    command = event["content"]
    assert {k: v for k, v in command.items() if k != "signatures"} == {
        "command": "redact",
        "room_id": verdict.room_id,
        "event_id": verdict.event_id,
    }
    assert list(command["signatures"][warden.name]) == [POLICY_SERVER_KEY_ID]
    policy_verify = get_verify_key(warden.policy_key)
    policy_verify.version = "policy_server"
    verify_signed_json(command, warden.name, policy_verify)

    # The moderator saw Synapse's 2xx to the transaction (and nothing failed on the way);
    # the bot may have the command before the answer reached the moderator.
    def sent() -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in warden.log_lines("moderation_command_transaction")
            if line.startswith("{")
        ]

    def delivered() -> list[dict[str, Any]]:
        return [
            line
            for line in sent()
            if line["outcome"] == "ok" and line["destination"] == synapse.server_name
        ]

    # Only this destination's lines: the moderator also retries commands other tests of
    # the session queued for servers gone since. A retry before the success (a slow answer
    # under load) repeats the same transaction ID.
    ok = await eventually(delivered, timeout=60, what="the moderator's transaction log line")
    line = ok[-1]
    here = [e for e in sent() if e["destination"] == synapse.server_name]
    assert {e["txn_id"] for e in here} == {line["txn_id"]}, here
    # Synapse's request log shows the PUT /send it answered with 200.
    await eventually(
        lambda: synapse.log_lines(f"PUT /_matrix/federation/v1/send/{line['txn_id']}", " 200 "),
        timeout=60,
        what="Synapse's log of the 200",
    )

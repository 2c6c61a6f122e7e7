"""The moderator as a real process, killed while a command transaction is in flight.

The destination accepts the transaction, then answers far too late; the moderator is
killed with SIGKILL before the answer arrives. Commands published while no moderator
runs wait in JetStream. The restarted process finds the stored transaction once the
dead one's claim has run out, resends it under the same ID (the destination answers
the repeat without processing it again), then sends the rest: every command is
processed exactly once, and the process's metrics say so.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from signedjson.key import get_verify_key
from signedjson.sign import verify_signed_json

from tests.federation.conftest import (  # noqa: F401  (fixtures)
    LOOPBACK,
    HTTPSServerFactory,
    https_server,
    tls_ca,
    tls_ca_file,
)
from tests.moderator.federation_destination import OUR_NAME, Destination, Keyring
from tests.moderator.verdict_stream import (
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from tests.service_processes import ServiceProcess
from warden.bus.subjects import (
    MODERATION_COMMAND_REQUESTS_CONSUMER,
    MODERATION_COMMANDS_CONSUMER,
    MODERATION_REQUEST_SUBJECT,
    MODERATION_REQUESTS_CONSUMER,
    MODERATOR_CONSUMER,
    VERDICTS_STREAM,
)
from warden.matrix.keys import key_id_of, load_signing_key
from warden.policy.config import validate_community_config
from warden.settings import DEFAULT_DENIED_NETWORKS
from warden.storage import communities

pytestmark = pytest.mark.slow

CONSUMERS = {
    MODERATOR_CONSUMER: None,
    MODERATION_REQUESTS_CONSUMER: MODERATION_REQUEST_SUBJECT,
    MODERATION_COMMANDS_CONSUMER: None,
    MODERATION_COMMAND_REQUESTS_CONSUMER: MODERATION_REQUEST_SUBJECT,
}


@pytest.fixture
async def service_consumers(verdicts_js: Any, pg_pool: asyncpg.Pool) -> AsyncIterator[None]:
    """The service's own durable consumers, reset to start at new messages."""
    await pg_pool.execute("DELETE FROM moderation_command_destinations")
    for name, subject in CONSUMERS.items():
        await fresh_durable(verdicts_js, name, subject=subject)
    yield
    for name in CONSUMERS:
        await verdicts_js.delete_consumer(VERDICTS_STREAM, name)


async def test_killed_mid_transaction_then_restarted_loses_nothing(
    spawn_service: Callable[..., ServiceProcess],
    key_paths: tuple[Path, Path],
    https_server: HTTPSServerFactory,  # noqa: F811
    tls_ca_file: str,  # noqa: F811
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    service_consumers: None,
) -> None:
    federation_key, policy_key = (load_signing_key(p) for p in key_paths)
    dest = Destination(
        "", Keyring(key_id_of(federation_key), get_verify_key(federation_key)), delays=[60.0]
    )
    server = await https_server(dest, host="127.0.0.1")
    dest.name = server.address
    community = await communities.create_community(pg_pool, "bots")
    config = validate_community_config({"moderation_bot_user_id": f"@bot:{dest.name}"})
    await communities.update_community(pg_pool, community.community_id, config=config)
    env = {
        "PS_HOMESERVER_DENIED_NETWORKS": ",".join(
            n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in LOOPBACK
        ),
        "PS_FEDERATION_CA_FILE": tls_ca_file,
        "PS_FEDERATION_TIMEOUT_SECONDS": "2",
        "PS_MODERATION_COMMAND_BACKOFF_BASE_SECONDS": "0.2",
        "PS_MODERATION_COMMAND_BACKOFF_MAX_SECONDS": "0.5",
        "PS_MODERATION_COMMAND_POLL_SECONDS": "0.2",
    }

    def verdict() -> Any:
        room_id = f"!{uuid.uuid4().hex[:12]}:hs.test"
        return prohibited_verdict(room_id, community_id=community.community_id)

    first = spawn_service("moderator", **env)
    await asyncio.to_thread(first.wait_ready)
    before = verdict()
    await publish_verdict(verdicts_js, before)
    await wait_for(lambda: len(dest.attempts) == 1, "the transaction in flight")
    in_flight = dest.attempts[0].txn_id
    first.proc.kill()
    await asyncio.to_thread(first.proc.wait, 10)

    during = [verdict() for _ in range(3)]
    for v in during:
        await publish_verdict(verdicts_js, v)
    second = spawn_service("moderator", **env)
    await asyncio.to_thread(second.wait_ready)
    expected = sorted(v.event_id for v in [before, *during])
    await wait_for(lambda: sorted(dest.event_ids()) == expected, "every command", timeout=60)

    # The killed process's transaction was sent again under its ID, with its command.
    resent = [a for a in dest.attempts if a.txn_id == in_flight]
    assert len(resent) == 2 and resent[0].body["edus"] == resent[1].body["edus"]
    assert len(dest.event_ids()) == len(expected)  # each processed once
    policy_verify = get_verify_key(policy_key)
    policy_verify.version = "policy_server"
    for command in dest.commands():
        verify_signed_json(command, OUR_NAME, policy_verify)

    async def all_sent() -> bool:
        text = (await asyncio.to_thread(httpx.get, f"{second.metrics_url}/metrics")).text
        return 'warden_moderation_commands_total{outcome="sent"} 4.0' in text

    # The first transaction was accepted before the kill, so the restarted process sent
    # all four commands (the repeat included) and then had nothing left.
    await wait_for(all_sent, "the sent counter")
    assert await pg_pool.fetchval("SELECT count(*) FROM moderation_command_edus") == 0
    assert second.stop() == 0

"""Redaction commands to moderation bots, end to end through real services.

Verdicts go through the real verdicts stream (NATS JetStream) to the moderator's
command consumers; the queue is in the real PostgreSQL; each destination is a real
local HTTPS federation server (trustme certificate) that serves a key document,
checks the X-Matrix signature of every ``/send`` with Warden's federation key, and,
like Synapse, treats a transaction ID it already accepted as a repeat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import verify_signed_json

from tests.cut_connections import CutConnectionPool
from tests.federation.conftest import (  # noqa: F401  (fixtures)
    LOOPBACK,
    HTTPSServerFactory,
    LocalHTTPSServer,
    https_server,
    tls_ca,
    tls_ca_file,
)
from tests.local_servers import stop_all
from tests.moderator.conftest import FakeClientAPI, LocalHTTPServer
from tests.moderator.federation_destination import OUR_NAME, Attempt, Destination, Keyring
from tests.moderator.verdict_stream import (
    consumer_settled,
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from warden.bus.subjects import MODERATION_REQUEST_SUBJECT, VERDICTS_STREAM
from warden.matrix.ids import ServerName
from warden.matrix.keys import POLICY_SERVER_KEY_ID, key_id_of
from warden.policy.config import ConfigError, validate_community_config
from warden.runtime.identity import Identity
from warden.settings import DEFAULT_DENIED_NETWORKS, Settings
from warden.storage import communities, rooms
from warden.storage import moderation_commands as queue
from warden.storage.verdicts import insert_verdicts
from warden_gateway.moderation_requests import request_message
from warden_moderator.command_sender import CommandSender
from warden_moderator.commands import COMMAND_TYPE, build_command_edu
from warden_moderator.service import ModeratorService

MODERATOR = "@mod:hs.test"
TOKEN = "syt_commands_token"


def commands(outcome: str) -> float:
    """warden_moderation_commands_total{outcome}."""
    value = REGISTRY.get_sample_value("warden_moderation_commands_total", {"outcome": outcome})
    return value or 0.0


@pytest.fixture
def identity() -> Identity:
    federation = generate_signing_key("fed1")
    policy = generate_signing_key("pol1")
    return Identity(ServerName(OUR_NAME), federation, key_id_of(federation), policy)


@pytest.fixture
def start_destination(
    https_server: HTTPSServerFactory,  # noqa: F811
    identity: Identity,
) -> Callable[..., Any]:
    """``await start_destination(status=200, port=0)`` → (Destination, server)."""

    async def start(
        dest: Destination | None = None, port: int = 0
    ) -> tuple[Destination, LocalHTTPSServer]:
        keyring = Keyring(identity.federation_key_id, get_verify_key(identity.federation_key))
        app = dest or Destination("", keyring)
        server = await https_server(app, host="127.0.0.1", port=port)
        app.name = server.address
        return app, server

    return start


@pytest.fixture
async def clean_queue(pg_pool: asyncpg.Pool) -> None:
    """Start each test with an empty queue (the database is shared by the session)."""
    await pg_pool.execute("DELETE FROM moderation_command_destinations")


@pytest.fixture
def command_settings(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,  # noqa: F811
) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "homeserver_denied_networks": [
                n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in LOOPBACK
            ],
            "federation_ca_file": tls_ca_file,
            "federation_timeout_seconds": 5.0,
            "moderation_command_backoff_base_seconds": 0.2,
            "moderation_command_backoff_max_seconds": 0.5,
            "moderation_command_poll_seconds": 0.2,
            "moderation_retry_base_seconds": 0.05,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


@dataclass
class Running:
    service: ModeratorService
    stopping: asyncio.Event
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 30)
        await self.service.aclose()


@pytest.fixture
async def moderator(
    command_settings: Callable[..., Settings],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    identity: Identity,
    clean_queue: None,
) -> AsyncIterator[Callable[..., Any]]:
    """``await moderator(**settings)``: run the moderator (both paths) in this process.

    Every start in one test uses the same durable consumers, as a restarted process does.
    """
    durable = f"test-commands-{uuid.uuid4().hex[:12]}"
    names = {
        durable: None,
        f"{durable}-requests": MODERATION_REQUEST_SUBJECT,
        f"{durable}-commands": None,
        f"{durable}-commands-requests": MODERATION_REQUEST_SUBJECT,
    }
    for name, subject in names.items():
        await fresh_durable(verdicts_js, name, subject=subject)
    running: list[Running] = []

    async def start(**overrides: Any) -> Running:
        service = await ModeratorService.create(
            command_settings(**overrides), pg_pool, verdicts_js, durable=durable, identity=identity
        )
        stopping = asyncio.Event()
        entry = Running(service, stopping, asyncio.create_task(service.run(stopping)))
        running.append(entry)
        return entry

    start.durable = durable  # type: ignore[attr-defined]
    yield start
    for entry in running:
        if not entry.task.done():
            await entry.stop()
    for name in names:
        await verdicts_js.delete_consumer(VERDICTS_STREAM, name)


async def community_with_bot(pool: asyncpg.Pool, bot: str) -> str:
    community = await communities.create_community(pool, "bots")
    config = validate_community_config({"moderation_bot_user_id": bot})
    await communities.update_community(pool, community.community_id, config=config)
    return community.community_id


def verdict_for(community_id: str) -> Any:
    return prohibited_verdict(f"!room{uuid.uuid4().hex[:8]}:hs.test", community_id=community_id)


# --- tests ----------------------------------------------------------------------------


def test_bot_user_id_is_validated_as_a_user_id() -> None:
    assert validate_community_config({"moderation_bot_user_id": "@bot:example.org:8448"}) == {
        "moderation_bot_user_id": "@bot:example.org:8448"
    }
    for bad in ["bot", "@bot", "@:example.org", "@bot:bad name", "#room:example.org", 5]:
        with pytest.raises(ConfigError, match="moderation_bot_user_id"):
            validate_community_config({"moderation_bot_user_id": bad})


async def test_command_reaches_the_bot_signed_with_the_policy_key_beside_the_client_api(
    moderator: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    identity: Identity,
    fake_client_api: FakeClientAPI,
    http_server: Callable[..., Any],
) -> None:
    dest, _ = await start_destination()
    bot = f"@bot:{dest.name}"
    community_id = await community_with_bot(pg_pool, bot)
    # The room also has a Client-Server API moderator: both mechanisms act.
    fake_client_api.tokens[TOKEN] = MODERATOR
    homeserver: LocalHTTPServer = await http_server(fake_client_api)
    verdict = verdict_for(community_id)
    await rooms.put_room(pg_pool, verdict.room_id, "10", community_id)
    await rooms.set_moderator(pg_pool, verdict.room_id, MODERATOR)
    sent_before = commands("sent")
    await moderator(moderator_access_tokens=[f"{homeserver.base_url}:{TOKEN}"])

    await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: len(dest.accepted) == 1, "the transaction")
    await wait_for(lambda: len(fake_client_api.requests) == 1, "the client API redaction")

    (body,) = dest.accepted.values()
    assert body["origin"] == OUR_NAME and body["pdus"] == []
    (edu,) = body["edus"]
    assert edu["edu_type"] == "m.direct_to_device"
    content = edu["content"]
    assert content["type"] == COMMAND_TYPE == "org.matrix.policyserv.command"
    assert content["sender"] == f"@policyserv:{OUR_NAME}"
    assert isinstance(content["message_id"], str) and content["message_id"]
    assert list(content["messages"]) == [bot]
    command = content["messages"][bot]["*"]
    assert {k: v for k, v in command.items() if k != "signatures"} == {
        "command": "redact",
        "room_id": verdict.room_id,
        "event_id": verdict.event_id,
    }
    assert list(command["signatures"][OUR_NAME]) == [POLICY_SERVER_KEY_ID]
    # Verifies with the policy key (as a bot does with m.room.policy's key) ...
    policy_verify = get_verify_key(identity.policy_key)
    policy_verify.version = "policy_server"
    verify_signed_json(command, OUR_NAME, policy_verify)
    # ... and not with the federation key, nor once the command is changed.
    fed_verify = get_verify_key(identity.federation_key)
    fed_verify.version = "policy_server"
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        verify_signed_json(command, OUR_NAME, fed_verify)
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        verify_signed_json({**command, "event_id": "$other"}, OUR_NAME, policy_verify)
    assert fake_client_api.requests[0].event_id == verdict.event_id
    # The sender records the answer after the destination has it.
    await wait_for(lambda: _queue_empty(pg_pool), "the queue to empty")
    assert commands("sent") == sent_before + 1


async def _queue_empty(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM moderation_command_edus") == 0)


async def test_no_command_without_a_bot_nor_for_the_senders_own_server(
    moderator: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
) -> None:
    dest, _ = await start_destination()
    with_bot = await community_with_bot(pg_pool, f"@bot:{dest.name}")
    without_bot = (await communities.create_community(pg_pool, "no bot")).community_id
    running = await moderator()
    skipped = [
        verdict_for(without_bot),
        # The sender's own server asked: it refused its user's event, nothing spread.
        dataclasses.replace(verdict_for(with_bot), origin="evil.test"),
    ]
    for verdict in skipped:
        await publish_verdict(verdicts_js, verdict)
    marker = verdict_for(with_bot)
    seq = await publish_verdict(verdicts_js, marker)
    durable = f"{running.service.command_consumers[0].durable}"
    await wait_for(lambda: consumer_settled(verdicts_js, durable, seq), "the messages handled")
    await wait_for(lambda: len(dest.accepted) == 1, "the marker's transaction")
    assert dest.event_ids() == [marker.event_id]


async def test_a_refusal_asked_about_by_another_server_later_sends_the_command(
    moderator: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
) -> None:
    dest, _ = await start_destination()
    community_id = await community_with_bot(pg_pool, f"@bot:{dest.name}")
    await moderator()
    # First asked by the sender's own server: no command then ...
    verdict = dataclasses.replace(verdict_for(community_id), origin="evil.test")
    await insert_verdicts(pg_pool, [verdict])
    await publish_verdict(verdicts_js, verdict)
    # ... but once another server asks, the event may have spread: the gateway's
    # moderation request makes the command.
    body, headers = request_message(verdict.event_id, "bystander.test")
    await verdicts_js.publish(MODERATION_REQUEST_SUBJECT, body, headers=headers)
    await wait_for(lambda: len(dest.event_ids()) == 1, "the command")
    assert dest.event_ids() == [verdict.event_id]


async def test_destination_down_then_up_gets_each_command_once_under_one_txn_id(
    moderator: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
) -> None:
    dest, server = await start_destination()
    community_id = await community_with_bot(pg_pool, f"@bot:{dest.name}")
    dest.status = 503  # up but failing
    await moderator()
    verdicts = [verdict_for(community_id) for _ in range(5)]
    for verdict in verdicts:
        await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: len(dest.attempts) >= 2, "a retry")
    first_txn = dest.attempts[0].txn_id

    # Now really down: nothing listens on its port.
    stop_all([server])
    row = await pg_pool.fetchrow(
        "SELECT failures, txn_id FROM moderation_command_destinations WHERE destination = $1",
        dest.name,
    )
    assert row is not None and row["txn_id"] == first_txn
    await wait_for(
        lambda: _failures_above(pg_pool, dest.name, row["failures"]),
        "a failed attempt while the destination is down",
    )
    assert await pg_pool.fetchval(
        "SELECT count(*) FROM moderation_command_edus WHERE destination = $1", dest.name
    ) == len(verdicts)

    dest.status = 200
    await start_destination(dest, port=server.port)
    await wait_for(lambda: len(dest.event_ids()) == len(verdicts), "every command")

    # Every attempt of a transaction ID carried the same EDUs; the first one failing
    # was retried under its ID until accepted; no event was processed twice.
    by_txn: dict[str, list[Attempt]] = {}
    for attempt in dest.attempts:
        by_txn.setdefault(attempt.txn_id, []).append(attempt)
    for attempts in by_txn.values():
        assert all(a.body["edus"] == attempts[0].body["edus"] for a in attempts)
    assert [a.status for a in by_txn[first_txn]][-1] == 200
    assert len(by_txn[first_txn]) >= 3
    assert sorted(dest.event_ids()) == sorted(v.event_id for v in verdicts)
    assert all(sum(a.status == 200 for a in attempts) == 1 for attempts in by_txn.values())
    await wait_for(lambda: _queue_empty(pg_pool), "the queue to empty")


async def _failures_above(pool: asyncpg.Pool, destination: str, failures: int) -> bool:
    now = await pool.fetchval(
        "SELECT failures FROM moderation_command_destinations WHERE destination = $1",
        destination,
    )
    return bool(now > failures)


async def test_restart_of_the_moderator_loses_nothing(
    moderator: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
) -> None:
    dest, _ = await start_destination()
    community_id = await community_with_bot(pg_pool, f"@bot:{dest.name}")
    dest.status = 503
    first = await moderator()
    before = [verdict_for(community_id) for _ in range(3)]
    for verdict in before:
        await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: len(dest.attempts) >= 1, "an attempt")
    await wait_for(
        lambda: _queued(pg_pool, dest.name, len(before)), "every command queued before stop"
    )
    in_flight = dest.attempts[0].txn_id
    await first.stop()

    # Published while no moderator runs: JetStream keeps them for the durable consumer.
    during = [verdict_for(community_id) for _ in range(2)]
    for verdict in during:
        await publish_verdict(verdicts_js, verdict)
    dest.status = 200
    await moderator()
    expected = sorted(v.event_id for v in before + during)
    await wait_for(lambda: sorted(dest.event_ids()) == expected, "every command after restart")
    # The transaction in flight at the stop was resent under its ID after the restart.
    assert in_flight in dest.accepted
    assert len(dest.event_ids()) == len(expected)


async def _queued(pool: asyncpg.Pool, destination: str, n: int) -> bool:
    count = await pool.fetchval(
        "SELECT count(*) FROM moderation_command_edus WHERE destination = $1", destination
    )
    return bool(count == n)


async def _enqueue_many(
    pool: asyncpg.Pool, identity: Identity, destination: str, n: int, *, now_ms: int
) -> list[str]:
    event_ids = []
    for i in range(n):
        event_id = f"$e{i}-{uuid.uuid4().hex}"
        edu = build_command_edu(
            server_name=OUR_NAME,
            sender=f"@policyserv:{OUR_NAME}",
            bot_user_id=f"@bot:{destination}",
            room_id="!r:hs.test",
            event_id=event_id,
            policy_key=identity.policy_key,
        )
        outcome = await queue.enqueue(
            pool,
            destination=destination,
            event_id=event_id,
            edu_json=orjson.dumps(edu).decode(),
            now_ms=now_ms,
            max_queued=10_000,
        )
        assert outcome == "queued"
        event_ids.append(event_id)
    return event_ids


@pytest.fixture
async def sender(
    command_settings: Callable[..., Settings],
    pg_pool: asyncpg.Pool,
    identity: Identity,
    clean_queue: None,
) -> AsyncIterator[Callable[..., Any]]:
    """``await sender(**settings)``: run only the command sender (``pool=``: over that
    pool instead of the test database's); its task is ``sender.tasks[-1]``."""
    from warden.federation.client import FederationClient

    running: list[tuple[CommandSender, FederationClient, asyncio.Event, asyncio.Task[None]]] = []

    async def start(pool: Any = None, **overrides: Any) -> CommandSender:
        settings = command_settings(**overrides)
        federation = FederationClient(settings, identity.federation_key)
        instance = CommandSender(pool or pg_pool, federation, settings)
        stopping = asyncio.Event()
        task = asyncio.create_task(instance.run(stopping))
        running.append((instance, federation, stopping, task))
        start.tasks.append(task)  # type: ignore[attr-defined]
        return instance

    start.tasks = []  # type: ignore[attr-defined]

    yield start
    for _, federation, stopping, task in running:
        stopping.set()
        await asyncio.wait_for(task, 30)
        await federation.aclose()


async def test_at_most_100_edus_per_transaction_oldest_first(
    sender: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    identity: Identity,
) -> None:
    dest, _ = await start_destination()
    event_ids = await _enqueue_many(
        pg_pool, identity, dest.name, 250, now_ms=int(time.time() * 1000)
    )
    await sender()
    await wait_for(lambda: len(dest.event_ids()) == 250, "every command")
    sizes = [len(body["edus"]) for body in dest.accepted.values()]
    assert sizes == [100, 100, 50]
    assert dest.event_ids() == event_ids


async def test_a_down_destination_does_not_hold_up_others(
    sender: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    identity: Identity,
) -> None:
    failing, _ = await start_destination()
    failing.status = 500
    gone, gone_server = await start_destination()
    stop_all([gone_server])  # connection refused
    healthy, _ = await start_destination()
    now = int(time.time() * 1000)
    for d in (failing, gone, healthy):
        await _enqueue_many(pg_pool, identity, d.name, 3, now_ms=now)
    await sender(moderation_command_concurrency=2)
    await wait_for(lambda: len(healthy.event_ids()) == 3, "the healthy destination's commands")
    await wait_for(lambda: len(failing.attempts) >= 2, "the failing destination retried")
    assert failing.event_ids() == []
    await wait_for(lambda: _queued(pg_pool, healthy.name, 0), "the healthy queue to empty")
    _, queued = await queue.destination_states(pg_pool, int(time.time() * 1000))
    assert queued == 6  # the two others' commands are all kept
    rows = await pg_pool.fetch("SELECT destination, failures FROM moderation_command_destinations")
    failures = {r["destination"]: r["failures"] for r in rows}
    assert failures[healthy.name] == 0
    assert failures[failing.name] >= 1 and failures[gone.name] >= 1


@pytest.mark.parametrize("error", [None, RuntimeError("a bug")], ids=["cut", "bug"])
async def test_the_sender_outlives_connections_cut_by_a_restarting_database(
    error: Exception | None,
    sender: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    identity: Identity,
) -> None:
    # Seen in the fault suite: a query of the sender's loop on a connection cut by a
    # PostgreSQL shutting down raised asyncpg's InternalClientError, which ended the
    # loop and with it the moderator.
    # Anything else the loop meets (``error``) is logged and tried again too, as in a send.
    dest, _ = await start_destination()
    event_ids = await _enqueue_many(pg_pool, identity, dest.name, 3, now_ms=int(time.time() * 1000))
    cut = CutConnectionPool(pg_pool, error, failures=4)
    await sender(pool=cut)
    await wait_for(lambda: len(dest.event_ids()) == 3, "every command, once the queries work")
    assert cut.failures_left == 0
    assert dest.event_ids() == event_ids
    assert not sender.tasks[-1].done()  # type: ignore[attr-defined]


async def test_commands_older_than_the_retention_are_dropped_and_counted(
    sender: Callable[..., Any],
    start_destination: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    identity: Identity,
) -> None:
    dest, _ = await start_destination()
    now = int(time.time() * 1000)
    await _enqueue_many(pg_pool, identity, dest.name, 2, now_ms=now - 3 * 3_600_000)
    fresh = await _enqueue_many(pg_pool, identity, dest.name, 1, now_ms=now)
    expired_before = commands("expired")
    await sender(moderation_command_retention_hours=1.0)
    await wait_for(lambda: len(dest.event_ids()) == 1, "the fresh command")
    assert dest.event_ids() == fresh
    assert commands("expired") == expired_before + 2


async def test_one_sender_per_destination_and_a_full_queue_refuses(
    pg_pool: asyncpg.Pool, identity: Identity, clean_queue: None
) -> None:
    now = int(time.time() * 1000)
    await _enqueue_many(pg_pool, identity, "one.test", 2, now_ms=now)
    first = await queue.claim(
        pg_pool, "one.test", owner="a", now_ms=now, lease_ms=60_000, batch=100
    )
    assert first is not None and len(first.edus) == 2 and not first.retry
    # Another replica cannot claim it while the lease runs ...
    assert (
        await queue.claim(pg_pool, "one.test", owner="b", now_ms=now, lease_ms=60_000, batch=100)
        is None
    )
    # ... and gets the same transaction once it has run out (the claimer died).
    later = now + 61_000
    again = await queue.claim(pg_pool, "one.test", owner="b", now_ms=later, lease_ms=1, batch=100)
    assert again is not None and again.txn_id == first.txn_id and again.retry
    assert again.edus == first.edus
    # The dead claimer's late answer changes nothing; the new claimer's does.
    assert (
        await queue.complete(pg_pool, "one.test", owner="a", txn_id=first.txn_id, now_ms=later) == 0
    )
    assert (
        await queue.complete(pg_pool, "one.test", owner="b", txn_id=first.txn_id, now_ms=later) == 2
    )

    edu = orjson.dumps({"edu_type": "m.direct_to_device", "content": {}}).decode()
    outcomes = [
        await queue.enqueue(
            pg_pool, destination="full.test", event_id=e, edu_json=edu, now_ms=now, max_queued=2
        )
        for e in ("$a", "$a", "$b", "$c")
    ]
    assert outcomes == ["queued", "duplicate", "queued", "queue_full"]


async def test_a_command_already_sent_is_not_queued_again_by_a_redelivered_verdict(
    pg_pool: asyncpg.Pool, clean_queue: None
) -> None:
    # Found by the fault suite: the verdict message's acknowledgement was lost in a NATS
    # restart after its command was queued; by the redelivery (30 s later) the command
    # had been sent and its row deleted, so it was queued again and the bot got it twice.
    now = int(time.time() * 1000)
    destination, event_id = f"sent-{uuid.uuid4().hex[:8]}.test", f"${uuid.uuid4().hex}"
    edu = orjson.dumps({"edu_type": "m.direct_to_device", "content": {}}).decode()

    async def enqueue(at: int) -> str:
        return await queue.enqueue(
            pg_pool, destination=destination, event_id=event_id, edu_json=edu, now_ms=at,
            max_queued=10,
        )  # fmt: skip

    assert await enqueue(now) == "queued"
    sent = await queue.claim(pg_pool, destination, owner="a", now_ms=now, lease_ms=60_000, batch=10)
    assert sent is not None
    assert (
        await queue.complete(pg_pool, destination, owner="a", txn_id=sent.txn_id, now_ms=now) == 1
    )
    assert await enqueue(now + 30_000) == "duplicate"
    assert (
        await queue.claim(pg_pool, destination, owner="a", now_ms=now, lease_ms=1, batch=10) is None
    )
    # The record goes with the retention, like the queue's EDUs.
    await queue.expire(pg_pool, cutoff_ms=now + 1, now_ms=now + 1)
    assert await enqueue(now + 2) == "queued"

"""The moderator against real NATS JetStream and PostgreSQL and a local client API.

Verdicts are published to the real verdicts stream as the filter worker publishes
them; each test reads them through its own durable consumer (starting at new
messages), and a local HTTP server stands in for the moderator's homeserver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.moderator.conftest import FakeClientAPI, LocalHTTPServer, Scripted
from tests.moderator.verdict_stream import (
    consumer_settled,
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from warden.bus.subjects import MODERATION_REQUEST_SUBJECT, VERDICTS_STREAM
from warden.policy.verdict import SENDER_UNVERIFIED, ContentClass, FilterOutcome
from warden.settings import Settings
from warden.storage import deliveries, rooms
from warden.storage.verdicts import insert_verdicts
from warden_gateway.moderation_requests import request_message
from warden_moderator.client_api import REDACTION_REASON, redaction_path, redaction_txn_id
from warden_moderator.service import ModeratorService

MODERATOR = "@mod:hs.test"
TOKEN = "syt_moderator_token"


def actions(outcome: str) -> float:
    """The current value of warden_moderation_actions_total{action=redact,outcome}."""
    value = REGISTRY.get_sample_value(
        "warden_moderation_actions_total", {"action": "redact", "outcome": outcome}
    )
    return value or 0.0


@dataclass
class RunningModerator:
    service: ModeratorService
    durable: str
    stopping: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def homeserver(
    fake_client_api: FakeClientAPI, http_server: Callable[..., Any]
) -> LocalHTTPServer:
    """The fake client API listening, knowing the moderator's token."""
    fake_client_api.tokens[TOKEN] = MODERATOR
    server: LocalHTTPServer = await http_server(fake_client_api)
    return server


@pytest.fixture
async def start_moderator(
    make_settings: Callable[..., Settings],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    homeserver: LocalHTTPServer,
) -> AsyncIterator[Callable[..., Any]]:
    """Run the moderator in this process on a durable consumer of its own."""
    running: list[RunningModerator] = []

    async def start(**overrides: Any) -> RunningModerator:
        durable = f"test-moderator-{uuid.uuid4().hex[:12]}"
        await fresh_durable(verdicts_js, durable)
        await fresh_durable(verdicts_js, f"{durable}-requests", subject=MODERATION_REQUEST_SUBJECT)
        values: dict[str, Any] = {
            "moderator_access_tokens": [f"{homeserver.base_url}:{TOKEN}"],
            "moderation_retry_base_seconds": 0.05,
            "moderation_timeout_seconds": 5.0,
        }
        values.update(overrides)
        service = await ModeratorService.create(
            make_settings(**values), pg_pool, verdicts_js, durable=durable
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(service.run(stopping))
        entry = RunningModerator(service, durable, stopping, task)
        running.append(entry)
        return entry

    yield start
    for entry in running:
        entry.stopping.set()
        await asyncio.wait_for(entry.task, 30)
        await entry.service.aclose()
        await verdicts_js.delete_consumer(VERDICTS_STREAM, entry.durable)
        await verdicts_js.delete_consumer(VERDICTS_STREAM, f"{entry.durable}-requests")


async def protected_room(pool: asyncpg.Pool, moderator: str = MODERATOR) -> str:
    """A room in the default community, with ``moderator`` (if any) set."""
    # A slash and a plus in the ID check that path parts are percent-encoded.
    room_id = f"!r/{uuid.uuid4().hex[:10]}+x:hs.test"
    await rooms.put_room(pool, room_id, "10", "default")
    if moderator:
        await rooms.set_moderator(pool, room_id, moderator)
    return room_id


def new_event_id() -> str:
    return f"$ev/{uuid.uuid4().hex}+=:evil.test"


async def test_prohibited_event_is_redacted_once_with_the_derived_txn_id(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = dataclasses.replace(prohibited_verdict(room_id), event_id=new_event_id())
    ok_before = actions("ok")

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(
        lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the message to be acked"
    )

    assert len(fake_client_api.requests) == 1
    request = fake_client_api.requests[0]
    txn = redaction_txn_id(verdict.event_id)
    assert request.raw_path == redaction_path(room_id, verdict.event_id, txn)
    assert "/" not in request.raw_path.split("/rooms/")[1].split("/redact/")[0]
    assert (request.room_id, request.event_id, request.txn_id) == (room_id, verdict.event_id, txn)
    assert request.token == TOKEN
    assert request.body == {"reason": REDACTION_REASON}
    assert list(fake_client_api.redactions) == [(TOKEN, txn)]
    record = await deliveries.get_moderation_action(pg_pool, verdict.event_id)
    assert record is not None and record.status == "done" and record.attempts == 1
    assert actions("ok") == ok_before + 1


def test_txn_id_is_deterministic_url_safe_and_distinct() -> None:
    a, b = redaction_txn_id("$one:x"), redaction_txn_id("$two:x")
    assert a == redaction_txn_id("$one:x")
    assert a != b
    assert a.startswith("warden_")
    assert all(c.isalnum() or c in "-_" for c in a)


async def test_redelivered_verdict_is_not_redacted_again(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id)
    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "first ack")
    already = actions("already_done")

    # The same verdict again (as after JetStream's duplicate window): nothing is sent.
    seq = await publish_verdict(verdicts_js, verdict, msg_id=f"again-{verdict.event_id}")
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "second ack")

    assert len(fake_client_api.requests) == 1
    assert len(fake_client_api.redactions) == 1
    assert actions("already_done") == already + 1


async def test_event_refused_at_its_own_server_is_not_redacted(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id, sender="@spammer:evil.test", origin="evil.test")
    skipped = actions("skipped_own_server")

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")

    assert fake_client_api.requests == []
    assert actions("skipped_own_server") == skipped + 1
    assert await deliveries.get_moderation_action(pg_pool, verdict.event_id) is None


async def test_event_of_an_unverified_sender_is_not_redacted(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    # A third-party invite nobody proved @victim made (review H2): refused, but the
    # moderator must not act against the named user.
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id, sender="@victim:victim.test", origin="evil.test")
    verdict = dataclasses.replace(
        verdict,
        filters=(FilterOutcome(SENDER_UNVERIFIED, ContentClass.NEUTRAL), *verdict.filters),
    )
    assert not verdict.sender_verified
    skipped = actions("skipped_unverified_sender")

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")

    assert fake_client_api.requests == []
    assert actions("skipped_unverified_sender") == skipped + 1
    assert await deliveries.get_moderation_action(pg_pool, verdict.event_id) is None


async def test_moderation_request_redacts_the_stored_refusal_once(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    """A refusal its sender's server asked about first (skipped), then a moderation
    request naming another server (redacted), then the same request again (nothing)."""
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id, sender="@spammer:evil.test", origin="evil.test")
    await insert_verdicts(pg_pool, [verdict])
    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the verdict")
    assert fake_client_api.requests == []

    requests = f"{moderator.durable}-requests"
    for asker in ("bystander.test", "third.test"):
        body, headers = request_message(verdict.event_id, asker)
        seq = (await verdicts_js.publish(MODERATION_REQUEST_SUBJECT, body, headers=headers)).seq
        await wait_for(
            lambda seq=seq: consumer_settled(verdicts_js, requests, seq), "the request handled"
        )

    assert [r.event_id for r in fake_client_api.requests] == [verdict.event_id]
    assert list(fake_client_api.redactions) == [(TOKEN, redaction_txn_id(verdict.event_id))]
    record = await deliveries.get_moderation_action(pg_pool, verdict.event_id)
    assert record is not None and record.status == "done"


async def test_moderation_request_for_an_unknown_event_is_acked(
    start_moderator: Callable[..., Any], verdicts_js: Any, fake_client_api: FakeClientAPI
) -> None:
    moderator = await start_moderator()
    unknown = actions("unknown_event")
    body, headers = request_message(new_event_id(), "bystander.test")
    ack = await verdicts_js.publish(MODERATION_REQUEST_SUBJECT, body, headers=headers)
    await wait_for(
        lambda: consumer_settled(verdicts_js, f"{moderator.durable}-requests", ack.seq), "ack"
    )
    assert fake_client_api.requests == []
    assert actions("unknown_event") == unknown + 1


async def test_room_without_moderator_is_acked_and_nothing_sent(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    moderator = await start_moderator()
    no_moderator_room = await protected_room(pg_pool, moderator="")
    unknown_room = "!unknown:hs.test"
    # A moderator nobody configured a token for.
    other_room = await protected_room(pg_pool, moderator="@someone-else:hs.test")
    await wait_for(lambda: not moderator.service.client_api.any_pending, "whoami")
    no_mod, not_configured = actions("no_moderator"), actions("moderator_not_configured")

    for room_id in (no_moderator_room, unknown_room, other_room):
        seq = await publish_verdict(verdicts_js, prohibited_verdict(room_id))
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the acks")

    assert fake_client_api.requests == []
    assert actions("no_moderator") == no_mod + 2
    assert actions("moderator_not_configured") == not_configured + 1


@pytest.mark.parametrize(
    "first",
    [
        Scripted(status=500),
        Scripted(status=429, body={"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 200}),
    ],
    ids=["500", "429"],
)
async def test_temporary_failure_is_retried_then_done(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
    first: Scripted,
) -> None:
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id)
    fake_client_api.script = [first, Scripted(status=200)]
    retries = actions("retry")

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")

    statuses = [r.status for r in fake_client_api.requests]
    assert statuses == [first.status, 200]
    assert {r.txn_id for r in fake_client_api.requests} == {redaction_txn_id(verdict.event_id)}
    assert len(fake_client_api.redactions) == 1
    record = await deliveries.get_moderation_action(pg_pool, verdict.event_id)
    assert record is not None and record.status == "done" and record.attempts == 2
    assert actions("retry") >= retries + 1


async def test_forbidden_is_recorded_failed_and_not_retried(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id)
    forbidden = Scripted(status=403, body={"errcode": "M_FORBIDDEN", "error": "not a mod"})
    fake_client_api.script = [forbidden] * 5
    failed = actions("failed")

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")

    assert [r.status for r in fake_client_api.requests] == [403]
    assert fake_client_api.redactions == {}
    record = await deliveries.get_moderation_action(pg_pool, verdict.event_id)
    assert record is not None and record.status == "failed"
    assert "M_FORBIDDEN" in record.last_error
    assert actions("failed") == failed + 1
    info = await verdicts_js.consumer_info(VERDICTS_STREAM, moderator.durable)
    assert info.num_redelivered == 0


async def test_temporary_failures_give_up_after_max_attempts(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    moderator = await start_moderator(moderation_max_attempts=3)
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id)
    fake_client_api.script = [Scripted(status=502)] * 10

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")

    assert [r.status for r in fake_client_api.requests] == [502, 502, 502]
    record = await deliveries.get_moderation_action(pg_pool, verdict.event_id)
    assert record is not None and record.status == "failed" and record.attempts == 3


async def test_whoami_failure_at_start_is_retried_not_fatal(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
) -> None:
    fake_client_api.whoami_failures = 2  # the homeserver is not up yet
    moderator = await start_moderator()
    room_id = await protected_room(pg_pool)
    verdict = prohibited_verdict(room_id)

    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")

    assert not moderator.task.done()
    assert fake_client_api.whoami_calls >= 3
    assert len(fake_client_api.redactions) == 1
    client = moderator.service.client_api.for_user(MODERATOR)
    assert client is not None and client.state == "resolved"


async def test_rejected_token_is_invalid_and_room_acked(
    start_moderator: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    fake_client_api: FakeClientAPI,
    homeserver: LocalHTTPServer,
) -> None:
    moderator = await start_moderator(
        moderator_access_tokens=[f"{homeserver.base_url}:{TOKEN}", f"{homeserver.base_url}:bad"]
    )
    await wait_for(lambda: not moderator.service.client_api.any_pending, "whoami")
    states = sorted(c.state for c in moderator.service.client_api.clients)
    assert states == ["invalid", "resolved"]
    assert "bad" not in repr(moderator.service.client_api.clients)
    room_id = await protected_room(pg_pool)
    seq = await publish_verdict(verdicts_js, prohibited_verdict(room_id))
    await wait_for(lambda: consumer_settled(verdicts_js, moderator.durable, seq), "the ack")
    assert len(fake_client_api.redactions) == 1

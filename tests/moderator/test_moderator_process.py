"""The moderator as a real process: killed while a redaction is in flight, restarted.

The homeserver records the redaction, then answers slowly; the moderator is killed
with SIGKILL before the answer arrives, so the message was never acked. JetStream
redelivers it to the restarted process, which sends the same transaction ID again; the
homeserver deduplicates it, so exactly one redaction exists, and the message is acked.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from tests.moderator.conftest import FakeClientAPI, LocalHTTPServer, Scripted
from tests.moderator.verdict_stream import (
    consumer_settled,
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from tests.service_processes import ServiceProcess
from warden.bus.subjects import (
    MODERATION_REQUEST_SUBJECT,
    MODERATION_REQUESTS_CONSUMER,
    MODERATOR_CONSUMER,
    VERDICTS_STREAM,
)
from warden.storage import deliveries, rooms
from warden_moderator.client_api import redaction_txn_id

pytestmark = pytest.mark.slow

MODERATOR = "@mod:hs.test"
TOKEN = "syt_process_token"


@pytest.fixture
async def moderator_durable(verdicts_js: Any) -> AsyncIterator[str]:
    """The service's own durable consumer, reset to start at new messages, short ack_wait.

    A short ack_wait makes JetStream hand the killed process's message back quickly.
    """
    await fresh_durable(verdicts_js, MODERATOR_CONSUMER, ack_wait=2.0)
    await fresh_durable(
        verdicts_js, MODERATION_REQUESTS_CONSUMER, subject=MODERATION_REQUEST_SUBJECT
    )
    yield MODERATOR_CONSUMER
    await verdicts_js.delete_consumer(VERDICTS_STREAM, MODERATOR_CONSUMER)
    await verdicts_js.delete_consumer(VERDICTS_STREAM, MODERATION_REQUESTS_CONSUMER)


def json_lines(output: str) -> list[dict[str, Any]]:
    lines = []
    for line in output.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def test_killed_mid_redaction_then_restarted_redacts_exactly_once(
    spawn_service: Callable[..., ServiceProcess],
    fake_client_api: FakeClientAPI,
    http_server: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    moderator_durable: str,
) -> None:
    fake_client_api.tokens[TOKEN] = MODERATOR
    # The first redact request is acted on, then answered far too late.
    fake_client_api.script = [Scripted(status=200, delay=60.0)]
    homeserver: LocalHTTPServer = await http_server(fake_client_api)
    room_id = f"!{uuid.uuid4().hex[:12]}:hs.test"
    await rooms.put_room(pg_pool, room_id, "10", "default")
    await rooms.set_moderator(pg_pool, room_id, MODERATOR)
    env = {
        "PS_MODERATOR_ACCESS_TOKENS": f"{homeserver.base_url}:{TOKEN}",
        "PS_MODERATION_RETRY_BASE_SECONDS": "0.2",
        "PS_MODERATION_TIMEOUT_SECONDS": "120",
    }

    first = spawn_service("moderator", **env)
    await asyncio.to_thread(first.wait_ready)
    await wait_for(lambda: fake_client_api.whoami_calls >= 1, "whoami")
    verdict = prohibited_verdict(room_id)
    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: len(fake_client_api.requests) == 1, "the redaction in flight")
    first.proc.kill()
    await asyncio.to_thread(first.proc.wait, 10)
    info = await verdicts_js.consumer_info(VERDICTS_STREAM, moderator_durable)
    assert info.num_ack_pending == 1  # killed before the ack

    second = spawn_service("moderator", **env)
    await asyncio.to_thread(second.wait_ready)
    await wait_for(
        lambda: consumer_settled(verdicts_js, moderator_durable, seq),
        "the redelivered message to be acked",
        timeout=60,
    )

    txn = redaction_txn_id(verdict.event_id)
    assert len(fake_client_api.requests) >= 2
    assert {r.txn_id for r in fake_client_api.requests} == {txn}
    assert list(fake_client_api.redactions) == [(TOKEN, txn)]  # exactly one redaction
    record = await deliveries.get_moderation_action(pg_pool, verdict.event_id)
    assert record is not None and record.status == "done" and record.attempts >= 2

    # One JSON log line for the action, naming the event and no content.
    logged = [
        line
        for line in json_lines(second.output())
        if line.get("event") == "moderation_action" and line.get("event_id") == verdict.event_id
    ]
    assert [line["outcome"] for line in logged] == ["ok"]
    assert logged[0]["service"] == "moderator"
    metrics = httpx.get(f"{second.metrics_url}/metrics").text
    assert 'warden_moderation_actions_total{action="redact",outcome="ok"} 1.0' in metrics
    assert second.stop() == 0

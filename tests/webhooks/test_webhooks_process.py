"""The webhooks service as a real process: killed while a POST is in flight, restarted.

The target takes the POST (it stores it under its Idempotency-Key), then answers
slowly; the service is killed with SIGKILL before the answer, so neither the delivery
record nor the ack was written. JetStream redelivers the message to the restarted
process, which POSTs again with the same key: the target sees two raw POSTs and
processes the event once, and the message ends acked and recorded delivered.
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

from tests.moderator.verdict_stream import (
    consumer_settled,
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from tests.service_processes import ServiceProcess
from tests.webhooks.conftest import (
    DENIED_EXCEPT_LOOPBACK,
    Answer,
    LocalHTTPSServer,
    WebhookReceiver,
)
from warden.bus.subjects import VERDICTS_STREAM, WEBHOOKS_CONSUMER
from warden.storage import communities, deliveries

pytestmark = pytest.mark.slow


@pytest.fixture
async def webhooks_durable(verdicts_js: Any) -> AsyncIterator[str]:
    """The service's own durable consumer, reset to start at new messages, short ack_wait."""
    await fresh_durable(verdicts_js, WEBHOOKS_CONSUMER, ack_wait=2.0)
    yield WEBHOOKS_CONSUMER
    await verdicts_js.delete_consumer(VERDICTS_STREAM, WEBHOOKS_CONSUMER)


async def test_killed_mid_post_then_restarted_is_processed_once(
    spawn_service: Callable[..., ServiceProcess],
    receiver: WebhookReceiver,
    https_target: Callable[..., Any],
    webhook_ca_file: str,
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    webhooks_durable: str,
) -> None:
    receiver.script = [Answer(status=200, delay=60.0)]
    target: LocalHTTPSServer = await https_target(receiver)
    community = await communities.create_community(pg_pool, f"c-{uuid.uuid4().hex[:8]}")
    await communities.update_community(
        pg_pool, community.community_id, config={"webhook_url": target.url("/hook")}
    )
    env = {
        "PS_ALLOWED_WEBHOOK_DOMAINS": "localhost",
        "PS_WEBHOOK_CA_FILE": webhook_ca_file,
        "PS_HOMESERVER_DENIED_NETWORKS": ",".join(DENIED_EXCEPT_LOOPBACK),
        "PS_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "PS_WEBHOOK_TIMEOUT_SECONDS": "120",
    }

    first = spawn_service("webhooks", **env)
    await asyncio.to_thread(first.wait_ready)
    verdict = prohibited_verdict("!room:hs.test", community_id=community.community_id)
    seq = await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: len(receiver.raw) == 1, "the POST in flight")
    first.proc.kill()
    await asyncio.to_thread(first.proc.wait, 10)
    claimed = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert claimed is not None and (claimed.status, claimed.attempts) == ("pending", 0)

    second = spawn_service("webhooks", **env)
    await asyncio.to_thread(second.wait_ready)
    await wait_for(
        lambda: consumer_settled(verdicts_js, webhooks_durable, seq),
        "the redelivered message to be acked",
        timeout=60,
    )

    assert len(receiver.raw) >= 2  # at least once on the wire
    assert {p.headers["idempotency-key"] for p in receiver.raw} == {verdict.event_id}
    assert list(receiver.processed) == [verdict.event_id]  # once, as the receiver sees it
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and record.status == "delivered" and record.attempts >= 2

    logged = []
    for line in second.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "webhook_action" and entry.get("event_id") == verdict.event_id:
            logged.append(entry)
    assert [e["outcome"] for e in logged] == ["delivered"]
    assert logged[0]["url_host"] == "localhost"
    assert "/hook" not in json.dumps(logged[0])  # the URL's path may hold a secret
    metrics = httpx.get(f"{second.metrics_url}/metrics").text
    assert 'warden_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
    assert second.stop() == 0

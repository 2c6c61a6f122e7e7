"""The webhooks service against real NATS JetStream and PostgreSQL and a local HTTPS target.

Verdicts are published to the real verdicts stream as the filter worker publishes
them; each test reads them through its own durable consumer (starting at new messages).
"""

from __future__ import annotations

import asyncio
import html
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.moderator.verdict_stream import (
    consumer_settled,
    fresh_durable,
    prohibited_verdict,
    publish_verdict,
    wait_for,
)
from tests.webhooks.conftest import (
    DENIED_EXCEPT_LOOPBACK,
    Answer,
    LocalHTTPSServer,
    WebhookReceiver,
)
from warden.bus.subjects import VERDICTS_STREAM
from warden.settings import Settings
from warden.storage import communities, deliveries
from warden_webhooks.service import WebhooksService


def deliveries_metric(outcome: str) -> float:
    value = REGISTRY.get_sample_value("warden_webhook_deliveries_total", {"outcome": outcome})
    return value or 0.0


@dataclass
class RunningWebhooks:
    service: WebhooksService
    durable: str
    stopping: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def target(receiver: WebhookReceiver, https_target: Callable[..., Any]) -> LocalHTTPSServer:
    server: LocalHTTPSServer = await https_target(receiver)
    return server


@pytest.fixture
async def start_webhooks(
    make_settings: Callable[..., Settings],
    pg_pool: asyncpg.Pool,
    nats_client: Any,
    verdicts_js: Any,
    webhook_ca_file: str,
) -> AsyncIterator[Callable[..., Any]]:
    """Run the webhooks service in this process on a durable consumer of its own."""
    running: list[RunningWebhooks] = []

    async def start(**overrides: Any) -> RunningWebhooks:
        durable = f"test-webhooks-{uuid.uuid4().hex[:12]}"
        await fresh_durable(verdicts_js, durable)
        values: dict[str, Any] = {
            "allowed_webhook_domains": ["localhost"],
            "webhook_ca_file": webhook_ca_file,
            "homeserver_denied_networks": DENIED_EXCEPT_LOOPBACK,
            "webhook_retry_base_seconds": 0.05,
            "webhook_max_attempts": 3,
            "webhook_timeout_seconds": 10.0,
        }
        values.update(overrides)
        service = await WebhooksService.create(
            make_settings(**values), pg_pool, nats_client, durable=durable
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(service.run(stopping))
        entry = RunningWebhooks(service, durable, stopping, task)
        running.append(entry)
        return entry

    yield start
    for entry in running:
        entry.stopping.set()
        await asyncio.wait_for(entry.task, 30)
        await entry.service.aclose()
        await verdicts_js.delete_consumer(VERDICTS_STREAM, entry.durable)


async def community_with_webhook(pool: asyncpg.Pool, url: str) -> str:
    community = await communities.create_community(pool, f"c-{uuid.uuid4().hex[:8]}")
    await communities.update_community(pool, community.community_id, config={"webhook_url": url})
    return community.community_id


async def settle(js: Any, running: RunningWebhooks, seq: int) -> None:
    await wait_for(lambda: consumer_settled(js, running.durable, seq), "the message to be acked")


async def test_delivered_once_with_escaped_html_and_idempotency_key(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    running = await start_webhooks()
    community_id = await community_with_webhook(pg_pool, target.url("/hook/s3cret?x=1"))
    verdict = prohibited_verdict(
        "!room:hs.test",
        community_id=community_id,
        sender="@<script>alert(1)</script>:evil.test",
        body_excerpt="<img src=x onerror=alert(1)> buy now",
    )
    delivered = deliveries_metric("delivered")

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert len(receiver.raw) == 1
    post = receiver.raw[0]
    assert (post.method, post.path) == ("POST", "/hook/s3cret?x=1")
    assert post.headers["idempotency-key"] == verdict.event_id
    assert post.headers["content-type"] == "application/json"
    assert post.headers["host"] == f"localhost:{target.port}"
    body = post.json()
    assert set(body) == {"text", "html"}
    assert "<script>" not in body["html"] and "<img" not in body["html"]
    assert html.escape(verdict.sender) in body["html"]
    assert "<details>" in body["html"] and "&lt;img src=x" in body["html"]
    assert verdict.event_id in body["text"] and "buy now" not in body["text"]
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and record.status == "delivered" and record.attempts == 1
    row = await pg_pool.fetchrow(
        "SELECT url_host, community_id FROM webhook_deliveries WHERE event_id = $1",
        verdict.event_id,
    )
    assert row is not None and tuple(row) == ("localhost", community_id)
    assert deliveries_metric("delivered") == delivered + 1

    # The same verdict again (a redelivery after the duplicate window): not sent again.
    seq = await publish_verdict(verdicts_js, verdict, msg_id=f"again-{verdict.event_id}")
    await settle(verdicts_js, running, seq)
    assert len(receiver.raw) == 1


@pytest.mark.parametrize(
    ("url_of", "reason"),
    [
        (lambda t: t.url(scheme="http"), "http"),
        (lambda t: t.url(host="127.0.0.1"), "host not allowed"),
    ],
    ids=["http", "host-not-allowed"],
)
async def test_urls_that_are_not_allowed_are_refused(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
    url_of: Callable[[LocalHTTPSServer], str],
    reason: str,
) -> None:
    running = await start_webhooks()
    community_id = await community_with_webhook(pg_pool, url_of(target))
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)
    skipped = deliveries_metric("skipped_not_allowed")

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert receiver.raw == [], reason
    assert deliveries_metric("skipped_not_allowed") == skipped + 1
    assert await deliveries.get_webhook_delivery(pg_pool, verdict.event_id) is None


async def test_allowed_domain_resolving_to_a_denied_address_is_refused(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    # "localhost" is an allowed domain, but the default deny list covers loopback.
    running = await start_webhooks(
        homeserver_denied_networks=[*DENIED_EXCEPT_LOOPBACK, "127.0.0.0/8", "::1/128"]
    )
    community_id = await community_with_webhook(pg_pool, target.url())
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)
    skipped = deliveries_metric("skipped_not_allowed")

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert receiver.raw == []
    assert deliveries_metric("skipped_not_allowed") == skipped + 1


async def test_community_without_webhook_is_skipped(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
) -> None:
    running = await start_webhooks()
    no_url = deliveries_metric("skipped_no_url")
    seq = await publish_verdict(verdicts_js, prohibited_verdict("!r:hs.test"))  # default
    seq = await publish_verdict(
        verdicts_js, prohibited_verdict("!r:hs.test", community_id="no-such-community")
    )
    await settle(verdicts_js, running, seq)
    assert receiver.raw == []
    assert deliveries_metric("skipped_no_url") == no_url + 2


async def test_redirect_is_not_followed(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    running = await start_webhooks()
    receiver.script = [Answer(status=307, headers={"location": target.url("/elsewhere")})]
    community_id = await community_with_webhook(pg_pool, target.url("/hook"))
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert [p.path for p in receiver.raw] == ["/hook"]
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and record.status == "failed"
    assert "redirects are not followed" in record.last_error


async def test_server_errors_are_retried_then_recorded_failed(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    running = await start_webhooks(webhook_max_attempts=3)
    receiver.script = [Answer(status=500)] * 10
    community_id = await community_with_webhook(pg_pool, target.url())
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)
    failed, retry = deliveries_metric("failed"), deliveries_metric("retry")

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert len(receiver.raw) == 3
    assert {p.headers["idempotency-key"] for p in receiver.raw} == {verdict.event_id}
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None
    assert (record.status, record.attempts) == ("failed", 3)
    assert record.last_error.startswith("HTTP 500")
    assert deliveries_metric("failed") == failed + 1
    assert deliveries_metric("retry") == retry + 2


async def test_server_error_then_success_is_delivered(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    running = await start_webhooks()
    receiver.script = [Answer(status=503, headers={"retry-after": "0"}), Answer(status=204)]
    community_id = await community_with_webhook(pg_pool, target.url())
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert len(receiver.raw) == 2
    assert list(receiver.processed) == [verdict.event_id]
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and (record.status, record.attempts) == ("delivered", 2)


async def test_client_error_fails_without_retry(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    running = await start_webhooks()
    receiver.script = [Answer(status=404)] * 3
    community_id = await community_with_webhook(pg_pool, target.url())
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert len(receiver.raw) == 1
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and (record.status, record.attempts) == ("failed", 1)


async def test_untrusted_certificate_is_not_delivered(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    running = await start_webhooks(webhook_ca_file=None)  # the test CA is not trusted
    community_id = await community_with_webhook(pg_pool, target.url())
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)

    seq = await publish_verdict(verdicts_js, verdict)
    await settle(verdicts_js, running, seq)

    assert receiver.processed == {}
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and record.status == "failed"
    assert "certificate" in record.last_error


async def test_send_republication_while_the_post_is_in_flight_posts_once(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    """Review L10: the verdict and its ``/send`` re-publication make one POST, not two."""
    running = await start_webhooks()
    receiver.script = [Answer(status=200, delay=2.0)]
    community_id = await community_with_webhook(pg_pool, target.url("/hook"))
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)
    duplicate = deliveries_metric("duplicate")

    await publish_verdict(verdicts_js, verdict)
    await wait_for(lambda: len(receiver.raw) == 1, "the first POST in flight")
    seq = await publish_verdict(verdicts_js, verdict, msg_id=f"{verdict.event_id}/send")
    await settle(verdicts_js, running, seq)

    assert len(receiver.raw) == 1
    assert deliveries_metric("duplicate") == duplicate + 1
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and (record.status, record.attempts) == ("delivered", 1)


async def test_republication_during_a_pending_retry_leaves_the_retry_to_its_message(
    start_webhooks: Callable[..., Any],
    pg_pool: asyncpg.Pool,
    verdicts_js: Any,
    receiver: WebhookReceiver,
    target: LocalHTTPSServer,
) -> None:
    """A second message for a pending event does not POST; the first one's retry does."""
    running = await start_webhooks()
    receiver.script = [Answer(status=503, headers={"retry-after": "3"}), Answer(status=200)]
    community_id = await community_with_webhook(pg_pool, target.url("/hook"))
    verdict = prohibited_verdict("!room:hs.test", community_id=community_id)
    duplicate = deliveries_metric("duplicate")

    await publish_verdict(verdicts_js, verdict)

    async def pending() -> bool:
        record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
        return record is not None and record.attempts == 1

    await wait_for(pending, "the first attempt recorded pending")
    seq = await publish_verdict(verdicts_js, verdict, msg_id=f"{verdict.event_id}/send")
    await wait_for(
        lambda: deliveries_metric("duplicate") == duplicate + 1, "the second message skipped"
    )
    assert len(receiver.raw) == 1  # the retry waits for Retry-After
    await settle(verdicts_js, running, seq)

    assert len(receiver.raw) == 2
    record = await deliveries.get_webhook_delivery(pg_pool, verdict.event_id)
    assert record is not None and (record.status, record.attempts) == ("delivered", 2)

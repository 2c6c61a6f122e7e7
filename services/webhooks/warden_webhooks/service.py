"""The webhooks service put together: JetStream consumer, URL cache, guarded sender."""

from __future__ import annotations

import asyncio

import asyncpg
from nats.aio.client import Client as NATS

from warden.bus.consumer import PullConsumer, ensure_durable_consumer
from warden.bus.streams import StreamSettings, durable_consumer_config, ensure_verdicts_stream
from warden.bus.subjects import VERDICTS_STREAM, WEBHOOKS_CONSUMER, verdict_subject
from warden.policy.config import instance_defaults
from warden.policy.verdict import ContentClass
from warden.settings import Settings
from warden_webhooks.notifier import Notifier
from warden_webhooks.target import WebhookSender
from warden_webhooks.webhook_urls import WebhookURLs

# How long JetStream waits for an ack before redelivering. A running handler keeps
# extending it, so this only decides how soon a crashed replica's messages come back.
ACK_WAIT_SECONDS = 30.0
# A delivery claim outlasts one POST (the sender's total timeout) by this much.
CLAIM_MARGIN_SECONDS = 30.0


class WebhooksService:
    """Consumes prohibited verdicts and notifies the communities' webhooks."""

    def __init__(
        self, nc: NATS, consumer: PullConsumer, urls: WebhookURLs, sender: WebhookSender
    ) -> None:
        self._nc = nc
        self.consumer = consumer
        self.urls = urls
        self.sender = sender

    @classmethod
    async def create(
        cls,
        settings: Settings,
        pool: asyncpg.Pool,
        nc: NATS,
        *,
        durable: str = WEBHOOKS_CONSUMER,
    ) -> WebhooksService:
        """Make sure the stream and the durable consumer exist, and build the parts."""
        # The handler gives up by itself after its own attempts; never cut it short.
        max_deliveries = max(settings.bus_max_deliveries, settings.webhook_max_attempts)
        js = nc.jetstream()
        await ensure_verdicts_stream(js, limits=StreamSettings.from_settings(settings))
        await ensure_durable_consumer(
            js,
            VERDICTS_STREAM,
            durable_consumer_config(
                durable,
                verdict_subject(ContentClass.PROHIBITED.label),
                ACK_WAIT_SECONDS,
                max_deliveries,
            ),
        )
        urls = WebhookURLs(pool, instance_defaults())
        sender = WebhookSender(settings)
        notifier = Notifier(
            pool,
            urls,
            sender,
            allowed_domains=settings.allowed_webhook_domains,
            max_attempts=settings.webhook_max_attempts,
            retry_base_seconds=settings.webhook_retry_base_seconds,
            claim_seconds=settings.webhook_timeout_seconds + CLAIM_MARGIN_SECONDS,
        )
        consumer = PullConsumer(
            js,
            stream=VERDICTS_STREAM,
            durable=durable,
            handler=notifier,
            max_in_flight=settings.webhook_pool_size,
            retry_base_seconds=settings.webhook_retry_base_seconds,
            drain_timeout=settings.shutdown_delay_seconds
            + max(1.0, settings.shutdown_timeout_seconds - 5.0),
            max_deliveries=max_deliveries,
        )
        return cls(nc, consumer, urls, sender)

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping``, then drain."""
        await self.urls.subscribe(self._nc)
        try:
            await self.consumer.run(stopping)
        finally:
            await self.urls.unsubscribe()

    async def aclose(self) -> None:
        """Close HTTP connections."""
        await self.sender.aclose()

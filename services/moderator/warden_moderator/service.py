"""The moderator put together: JetStream consumer, token lookups, redaction handler."""

from __future__ import annotations

import asyncio

import asyncpg
from nats.js import JetStreamContext

from warden.bus.consumer import PullConsumer, ensure_durable_consumer
from warden.bus.streams import StreamSettings, durable_consumer_config, ensure_verdicts_stream
from warden.bus.subjects import (
    MODERATION_REQUEST_SUBJECT,
    MODERATOR_CONSUMER,
    VERDICTS_STREAM,
    verdict_subject,
)
from warden.federation.client import FederationClient
from warden.policy.config import instance_defaults
from warden.policy.verdict import ContentClass
from warden.runtime.identity import Identity
from warden.settings import Settings, parse_moderator_tokens
from warden_moderator.client_api import ClientAPI
from warden_moderator.command_sender import CommandSender
from warden_moderator.commands import CommandEnqueuer
from warden_moderator.redactor import Redactor

# How long JetStream waits for an ack before redelivering. A running handler keeps
# extending it, so this only decides how soon a crashed replica's messages come back.
ACK_WAIT_SECONDS = 30.0


class ModeratorService:
    """Consumes prohibited verdicts and moderation requests; redacts where a moderator can.

    Two durable consumers share one handler: ``consumer`` (prohibited verdicts, as
    first given) and ``requests`` (moderation requests: a refusal its sender's server
    asked about first, since asked about by another server).
    """

    def __init__(
        self,
        consumer: PullConsumer,
        client_api: ClientAPI,
        requests: PullConsumer | None = None,
        *,
        command_consumers: list[PullConsumer] | None = None,
        command_sender: CommandSender | None = None,
        federation: FederationClient | None = None,
    ) -> None:
        self.consumer = consumer
        self.client_api = client_api
        self.requests = requests
        self.command_consumers = command_consumers or []
        self.command_sender = command_sender
        self.federation = federation

    @classmethod
    async def create(
        cls,
        settings: Settings,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        *,
        durable: str = MODERATOR_CONSUMER,
        requests_durable: str | None = None,
        identity: Identity | None = None,
        federation: FederationClient | None = None,
    ) -> ModeratorService:
        """Make sure the stream and the durable consumers exist, and build the parts.

        ``requests_durable`` defaults to ``<durable>-requests``
        (``MODERATION_REQUESTS_CONSUMER`` for the default ``durable``). With
        ``identity`` (the keys), the command path runs too: consumers
        ``<durable>-commands`` and ``<durable>-commands-requests``
        (``MODERATION_COMMANDS_CONSUMER``, ``MODERATION_COMMAND_REQUESTS_CONSUMER``),
        and a sender over ``federation`` (built from the federation key if not given).
        """
        requests_durable = requests_durable or f"{durable}-requests"
        # The handler gives up by itself after its own attempts; never cut it short.
        max_deliveries = max(settings.bus_max_deliveries, settings.moderation_max_attempts)
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
        await ensure_durable_consumer(
            js,
            VERDICTS_STREAM,
            durable_consumer_config(
                requests_durable, MODERATION_REQUEST_SUBJECT, ACK_WAIT_SECONDS, max_deliveries
            ),
        )
        client_api = ClientAPI(
            parse_moderator_tokens(settings.moderator_access_tokens),
            timeout=settings.moderation_timeout_seconds,
            retry_base_seconds=settings.moderation_retry_base_seconds,
        )
        redactor = Redactor(
            pool,
            client_api,
            max_attempts=settings.moderation_max_attempts,
            retry_base_seconds=settings.moderation_retry_base_seconds,
        )
        consumers = [
            PullConsumer(
                js,
                stream=VERDICTS_STREAM,
                durable=name,
                handler=redactor,
                max_in_flight=settings.moderation_pool_size,
                retry_base_seconds=settings.moderation_retry_base_seconds,
                drain_timeout=settings.shutdown_delay_seconds
                + max(1.0, settings.shutdown_timeout_seconds - 5.0),
                max_deliveries=max_deliveries,
            )
            for name in (durable, requests_durable)
        ]
        if identity is None:
            return cls(consumers[0], client_api, consumers[1])
        federation = federation or FederationClient(settings, identity.federation_key)
        sender = CommandSender(pool, federation, settings)
        enqueuer = CommandEnqueuer(
            pool,
            server_name=identity.server_name,
            sender=f"@{settings.join_localpart}:{identity.server_name}",
            policy_key=identity.policy_key,
            instance_config=instance_defaults(),
            max_queued=settings.moderation_command_max_queued,
            wake=sender.wake,
        )
        command_consumers = []
        for name, subject in (
            (f"{durable}-commands", verdict_subject(ContentClass.PROHIBITED.label)),
            (f"{durable}-commands-requests", MODERATION_REQUEST_SUBJECT),
        ):
            await ensure_durable_consumer(
                js,
                VERDICTS_STREAM,
                durable_consumer_config(
                    name, subject, ACK_WAIT_SECONDS, settings.bus_max_deliveries
                ),
            )
            command_consumers.append(
                PullConsumer(
                    js,
                    stream=VERDICTS_STREAM,
                    durable=name,
                    handler=enqueuer,
                    max_in_flight=settings.moderation_pool_size,
                    retry_base_seconds=settings.moderation_retry_base_seconds,
                    drain_timeout=settings.shutdown_delay_seconds
                    + max(1.0, settings.shutdown_timeout_seconds - 5.0),
                    max_deliveries=settings.bus_max_deliveries,
                )
            )
        return cls(
            consumers[0],
            client_api,
            consumers[1],
            command_consumers=command_consumers,
            command_sender=sender,
            federation=federation,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        """Resolve tokens (in the background) and consume until ``stopping``, then drain."""
        resolver = asyncio.create_task(self.client_api.keep_resolving(stopping))
        try:
            runs = [self.consumer.run(stopping)]
            if self.requests is not None:
                runs.append(self.requests.run(stopping))
            runs.extend(c.run(stopping) for c in self.command_consumers)
            if self.command_sender is not None:
                runs.append(self.command_sender.run(stopping))
            await asyncio.gather(*runs)
        finally:
            resolver.cancel()
            await asyncio.gather(resolver, return_exceptions=True)

    async def aclose(self) -> None:
        """Close HTTP connections."""
        await self.client_api.aclose()
        if self.federation is not None:
            await self.federation.aclose()

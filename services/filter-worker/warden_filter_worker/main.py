"""Run the filter-worker service: judges events for the gateway, in a NATS queue group.

Start-up: read the instance filter defaults (a bad ``PS_*`` filter value stops the
worker with one line naming it, exit 2), connect PostgreSQL, Redis and NATS, make sure
the verdicts stream exists, listen for configuration changes, then join the
``FILTER_WORKERS_QUEUE`` queue group on ``EVALUATE_SUBJECT``. On SIGTERM the runtime
turns not-ready, then this service stops taking requests, finishes those in flight and
flushes its writes and publishes before NATS is drained.

Each worker also reads inbound PDUs (``room_state_consumer``) and takes its turn at the
periodic room state refresh (``state_refresh``) and, every
``PS_RETENTION_INTERVAL_MINUTES``, at pruning old rows (``warden.retention``).
"""

from __future__ import annotations

import functools
import logging
import sys

from signedjson.key import get_verify_key

from warden.bus.consumer import (
    PullConsumer,
    ensure_durable_consumer,
    raise_if_failed,
    run_with_runtime,
)
from warden.bus.streams import (
    DUPLICATE_WINDOW_SECONDS,
    StreamSettings,
    durable_consumer_config,
    ensure_inbound_stream,
    ensure_verdicts_stream,
)
from warden.bus.subjects import INBOUND_PDU_SUBJECT, INBOUND_STREAM, ROOM_STATE_CONSUMER
from warden.federation.client import FederationClient
from warden.federation.keyring import Keyring
from warden.federation.network_guard import NetworkGuard
from warden.filters.base import FilterDeps
from warden.filters.base import Group as FilterGroup
from warden.media_scan.scanner import build_media_scanner
from warden.openai_moderation import OpenAIModeration
from warden.policy.config import ConfigError, instance_defaults
from warden.policy.pipeline import Pipeline
from warden.retention import Pruner, RetentionPolicy
from warden.runtime import dependencies
from warden.runtime.identity import load_identity
from warden.runtime.service import Hook, bootstrap, run_async
from warden.settings import Settings
from warden.storage.room_state import StateCaps
from warden.storage.verdicts import insert_verdicts
from warden.trust.muninn import MuninnPoller
from warden_filter_worker.antispam_checks import AntispamCheckService
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.metrics import PUBLISH_PENDING, observe_outcome
from warden_filter_worker.outbox import OutboxSweeper, PublishedMarker
from warden_filter_worker.publisher import VerdictPublisher
from warden_filter_worker.room_state_consumer import RoomStateConsumer
from warden_filter_worker.state_refresh import StateRefresher
from warden_filter_worker.text_checks import TextCheckService

NAME = "filter-worker"

logger = logging.getLogger(__name__)

# Inbound PDUs one worker handles at once (each may wait for a verdict).
_ROOM_STATE_IN_FLIGHT = 32
# A /state answer of a large room is big; the default federation cap is 16 MiB.
_STATE_RESPONSE_MAX_BYTES = 64 * 1024 * 1024

# Slack on top of the longest possible evaluation (every group hitting the filter
# timeout) for the configuration read and the commit (see ``claim_timing``).
_CLAIM_SLACK_SECONDS = 10.0


def claim_timing(settings: Settings) -> tuple[float, float]:
    """The claim TTL and how long a request waits for another worker's verdict.

    The wait covers the longest possible evaluation (every group hitting the filter
    timeout) plus slack. The claim is renewed by its live holder, so it can be much
    shorter: at most a third of the wait, so a dead worker's claims lapse and are taken
    over before the requests waiting on them give up.
    """
    longest_evaluation = len(FilterGroup) * settings.filter_timeout_seconds
    if settings.hma_api_url:  # the HMA filter (main group) has its own, longer timeout
        extra = settings.hma_timeout_seconds - settings.filter_timeout_seconds
        longest_evaluation += max(0.0, extra)
    wait_seconds = longest_evaluation + _CLAIM_SLACK_SECONDS / 2
    return min(settings.evaluation_claim_ttl_seconds, wait_seconds / 3), wait_seconds


def run(settings: Settings) -> int:
    """Entry point for ``warden filter-worker``."""
    try:
        instance = instance_defaults()
    except ConfigError as exc:
        print(f"warden: invalid setting {exc.key}: {exc.message}", file=sys.stderr)
        return 2
    try:
        moderation = OpenAIModeration.from_settings(settings)
    except (OSError, ValueError) as exc:
        print(f"warden: invalid setting PS_OPENAI_FILTER_API_KEY_FILE: {exc}", file=sys.stderr)
        return 2
    runtime = bootstrap(NAME, settings)
    claim_ttl_seconds, wait_seconds = claim_timing(settings)

    async def main() -> None:
        pool = await dependencies.postgres(runtime)
        # Not required: /sign keeps answering without it (warden.runtime.redis_outage).
        redis = await dependencies.redis(runtime, required=False)
        nc = await dependencies.nats(runtime)
        js = nc.jetstream()
        await ensure_verdicts_stream(js, limits=StreamSettings.from_settings(settings))

        deps = FilterDeps(
            redis=redis,
            pool=pool,
            local_user_id=f"@{settings.join_localpart}:{settings.homeserver_name}",
            openai_moderation=moderation,
        )
        if moderation is not None:
            runtime.add_shutdown_hook("openai-moderation", moderation.aclose)
        elif instance.get("openai_filter_allowed_room_ids"):
            logger.warning(
                "PS_OPENAI_FILTER_ALLOWED_ROOM_IDS is set but no API key: "
                "the openai_filter filter judges nothing"
            )
        deps.media_scanner = build_media_scanner(settings, pool, redis)
        if deps.media_scanner is not None:
            runtime.add_shutdown_hook("media-scanner", deps.media_scanner.aclose)
        pipeline = Pipeline(
            deps, timeout_seconds=settings.filter_timeout_seconds, on_outcome=observe_outcome
        )
        configs = CommunityConfigCache(pool, instance)
        await configs.subscribe(nc)
        await deps.keyword_templates.subscribe(nc)
        await deps.keyword_templates.reload_all(trigger="first_use")
        verdict_log = settings.jetstream_verdict_log
        writer = GroupCommitWriter(
            pool, insert=functools.partial(insert_verdicts, verdict_log=verdict_log)
        )
        writer.start()
        marker = PublishedMarker(pool)
        publisher = VerdictPublisher(nc, on_published=marker.add)
        PUBLISH_PENDING.set_function(lambda: publisher.pending)
        sweeper = OutboxSweeper(
            pool,
            publisher.publish_now,
            interval_seconds=settings.outbox_sweep_seconds,
            # Older than any publish still being retried in memory.
            min_age_seconds=DUPLICATE_WINDOW_SECONDS,
        )
        service = EvaluationService(
            redis=redis,
            pool=pool,
            pipeline=pipeline,
            configs=configs,
            writer=writer,
            publisher=publisher,
            claim_ttl_seconds=claim_ttl_seconds,
            wait_seconds=wait_seconds,
            linger_seconds=settings.evaluation_batch_linger_ms / 1000,
            store_timeout_seconds=settings.filter_timeout_seconds,
            verdict_log=verdict_log,
            verdict_cache_seconds=settings.verdict_cache_seconds,
        )
        await service.start(nc)
        # The server-centric API's text checks: no verdict, nothing stored.
        text_checks = TextCheckService(
            deps=deps, configs=configs, timeout_seconds=settings.filter_timeout_seconds
        )
        await text_checks.start(nc)
        # The homeserver spam checks (/_warden/antispam/v1): no verdict, nothing stored.
        antispam_checks = AntispamCheckService(
            deps=deps, configs=configs, timeout_seconds=settings.filter_timeout_seconds
        )
        await antispam_checks.start(nc)

        async def stop() -> None:
            await configs.unsubscribe()
            await deps.keyword_templates.unsubscribe()
            await text_checks.stop()
            await antispam_checks.stop()
            await service.stop()

        # Hooks run last-added first: this runs before NATS is drained and pools close.
        runtime.add_shutdown_hook("evaluations", stop)

        # Room state: inbound PDUs from the gateway's /send, and the periodic refresh.
        identity = load_identity(settings)
        local_user_id = f"@{settings.join_localpart}:{identity.server_name}"
        federation = FederationClient(
            settings, identity.federation_key, max_response_size=_STATE_RESPONSE_MAX_BYTES
        )
        runtime.add_shutdown_hook("federation-client", federation.aclose)
        keyring = Keyring(
            settings,
            federation,
            redis,
            pool,
            our_server_name=identity.server_name,
            our_keys={identity.federation_key_id: get_verify_key(identity.federation_key)},
        )
        await ensure_inbound_stream(js, StreamSettings.from_settings(settings))
        await ensure_durable_consumer(
            js,
            INBOUND_STREAM,
            durable_consumer_config(
                ROOM_STATE_CONSUMER,
                INBOUND_PDU_SUBJECT,
                ack_wait=30.0,
                max_deliveries=settings.bus_max_deliveries,
            ),
        )
        room_state = RoomStateConsumer(
            pool=pool,
            nc=nc,
            js=js,
            keyring=keyring,
            server_name=identity.server_name,
            policy_verify_key=get_verify_key(identity.policy_key),
            local_user_id=local_user_id,
            verdict_timeout_seconds=settings.verdict_timeout_seconds,
            caps=StateCaps.from_settings(settings),
        )
        pull = PullConsumer(
            js,
            stream=INBOUND_STREAM,
            durable=ROOM_STATE_CONSUMER,
            handler=room_state.handle,
            max_in_flight=_ROOM_STATE_IN_FLIGHT,
            max_deliveries=settings.bus_max_deliveries,
        )
        task = run_with_runtime(runtime, "room-state-consumer", pull.run)
        refresher = StateRefresher(
            pool=pool,
            redis=redis,
            client=federation,
            keyring=keyring,
            trusted_origins=settings.trusted_origins,
            interval_seconds=settings.state_cache_interval_minutes * 60,
            local_user_id=local_user_id,
            caps=StateCaps.from_settings(settings),
        )

        async def refresh() -> None:
            await refresher.run(runtime.stopping)

        async def reload_templates() -> None:
            await deps.keyword_templates.run(runtime.stopping)

        # The Muninn Hall directory: one worker at a time polls it (redis_keys lock).
        muninn_poller = MuninnPoller(
            pool=pool,
            redis=redis,
            url=settings.muninn_hall_source_api_url,
            api_key=settings.muninn_hall_source_api_key,
            guard=NetworkGuard.from_settings(settings),
        )
        runtime.add_shutdown_hook("muninn-poller", muninn_poller.aclose)

        async def poll_muninn() -> None:
            await muninn_poller.run(runtime.stopping)

        background: list[Hook] = [
            marker.run,
            sweeper.run,
            refresh,
            reload_templates,
            poll_muninn,
        ]
        if settings.retention_interval_minutes > 0:
            pruner = Pruner(pool=pool, redis=redis, policy=RetentionPolicy.from_settings(settings))

            async def prune() -> None:
                await pruner.run(runtime.stopping, settings.retention_interval_minutes * 60)

            background.append(prune)

        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        await runtime.serve(background=background)
        raise_if_failed(task)

    return run_async(main)

"""Run the filter-worker service: judges events for the gateway, in a NATS queue group.

Start-up: read the instance filter defaults (a bad ``PS_*`` filter value stops the
worker with one line naming it, exit 2), connect PostgreSQL, Redis and NATS, make sure
the verdicts stream exists, listen for configuration changes, then join the
``FILTER_WORKERS_QUEUE`` queue group on ``EVALUATE_SUBJECT``. On SIGTERM the runtime
turns not-ready, then this service stops taking requests, finishes those in flight and
flushes its writes and publishes before NATS is drained.
"""

from __future__ import annotations

import sys

from warden.bus.streams import DUPLICATE_WINDOW_SECONDS, ensure_verdicts_stream
from warden.filters.base import FilterDeps
from warden.filters.base import Group as FilterGroup
from warden.policy.config import ConfigError, instance_defaults
from warden.policy.pipeline import Pipeline
from warden.runtime import dependencies
from warden.runtime.service import bootstrap, run_async
from warden.settings import Settings
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.metrics import observe_outcome
from warden_filter_worker.outbox import OutboxSweeper, PublishedMarker
from warden_filter_worker.publisher import VerdictPublisher

NAME = "filter-worker"

# Slack on top of the longest possible evaluation (every group hitting the filter
# timeout) for the configuration read and the commit.
_CLAIM_SLACK_SECONDS = 10.0


def run(settings: Settings) -> int:
    """Entry point for ``warden filter-worker``."""
    try:
        instance = instance_defaults()
    except ConfigError as exc:
        print(f"warden: invalid setting {exc.key}: {exc.message}", file=sys.stderr)
        return 2
    runtime = bootstrap(NAME, settings)
    longest_evaluation = len(FilterGroup) * settings.filter_timeout_seconds

    async def main() -> None:
        pool = await dependencies.postgres(runtime)
        redis = await dependencies.redis(runtime)
        nc = await dependencies.nats(runtime)
        js = nc.jetstream()
        await ensure_verdicts_stream(js)

        deps = FilterDeps(
            redis=redis,
            pool=pool,
            local_user_id=f"@{settings.join_localpart}:{settings.homeserver_name}",
        )
        pipeline = Pipeline(
            deps, timeout_seconds=settings.filter_timeout_seconds, on_outcome=observe_outcome
        )
        configs = CommunityConfigCache(pool, instance)
        await configs.subscribe(nc)
        writer = GroupCommitWriter(pool)
        writer.start()
        marker = PublishedMarker(pool)
        publisher = VerdictPublisher(js, on_published=marker.add)
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
            claim_ttl_seconds=longest_evaluation + _CLAIM_SLACK_SECONDS,
            wait_seconds=longest_evaluation + _CLAIM_SLACK_SECONDS / 2,
        )
        await service.start(nc)

        async def stop() -> None:
            await configs.unsubscribe()
            await service.stop()

        # Hooks run last-added first: this runs before NATS is drained and pools close.
        runtime.add_shutdown_hook("evaluations", stop)
        runtime.add_http_server("metrics", runtime.health_app(), settings.http_metrics_bind)
        await runtime.serve(background=[marker.run, sweeper.run])

    return run_async(main)

"""The outbox backlog gauges count committed verdicts JetStream has not acknowledged."""

from __future__ import annotations

import time

import asyncpg
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY

from tests.filter_worker.test_outbox import committed_verdict
from warden.storage.verdicts import insert_verdicts, mark_published
from warden_filter_worker.outbox import OutboxSweeper
from warden_filter_worker.publisher import VerdictPublisher


def sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def test_backlog_counts_unpublished_verdicts_and_the_oldest_age(
    pg_pool: asyncpg.Pool, nats_client: NATS
) -> None:
    publisher = VerdictPublisher(nats_client)
    sweeper = OutboxSweeper(pg_pool, publisher.publish_now, interval_seconds=1, min_age_seconds=30)
    before = await sweeper.measure_backlog()
    assert sample("warden_outbox_unpublished_verdicts") == before

    now_ms = int(time.time() * 1000)
    backlog = [committed_verdict(now_ms - 3_600_000), committed_verdict(now_ms)]
    backlog.append(committed_verdict(now_ms - 10_000))
    await insert_verdicts(pg_pool, backlog)

    assert await sweeper.measure_backlog() == before + 3
    assert sample("warden_outbox_unpublished_verdicts") == before + 3
    # The hour-old one (or an older one other tests left) is the oldest.
    age = sample("warden_outbox_oldest_unpublished_age_seconds")
    assert age is not None and age >= 3_599

    await mark_published(pg_pool, [v.event_id for v in backlog])
    assert await sweeper.measure_backlog() == before
    assert sample("warden_outbox_unpublished_verdicts") == before


async def test_an_empty_outbox_reports_zero_age(pg_pool: asyncpg.Pool, nats_client: NATS) -> None:
    await pg_pool.execute("UPDATE verdicts SET published = TRUE WHERE NOT published")
    sweeper = OutboxSweeper(
        pg_pool, VerdictPublisher(nats_client).publish_now, interval_seconds=1, min_age_seconds=30
    )
    assert await sweeper.measure_backlog() == 0
    assert sample("warden_outbox_unpublished_verdicts") == 0
    assert sample("warden_outbox_oldest_unpublished_age_seconds") == 0

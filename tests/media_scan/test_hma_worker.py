"""A filter worker with the HMA filter: a slow scan never holds other events' answers.

The scan tells its batch it waits outside (``slow_lane``), so the batch answers the
other events at once; a slow evaluation that says nothing is left behind after the
batch's early-settle delay instead.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from tests.filters.filter_helpers import OWN_USER, message
from tests.media_scan.conftest import ScannerFactory, Services, tag
from tests.media_scan.test_hma_filter import image
from warden.bus.evaluation import EvaluationRequest
from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import FilterDeps
from warden.policy import slow_lane
from warden.policy.config import instance_defaults
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService, _Answer, _Event
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher


@pytest.mark.parametrize(
    ("marked", "settle_early_seconds"),
    [
        # The scan says it waits outside: answered at once, whatever the delay.
        (True, 600.0),
        # Nothing said: the fallback delay answers the others.
        (False, 0.05),
    ],
    ids=["slow-lane", "fallback-delay"],
)
async def test_a_slow_scan_does_not_hold_the_answers_of_its_batch(
    marked: bool,
    settle_early_seconds: float,
    monkeypatch: pytest.MonkeyPatch,
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
) -> None:
    if not marked:
        monkeypatch.setattr(slow_lane, "watch", lambda mark: None)
    await ensure_verdicts_stream(nats_client.jetstream())
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
    deps.media_scanner = make_scanner()
    writer = GroupCommitWriter(pg_pool)
    service = EvaluationService(
        redis=redis_client,
        pool=pg_pool,
        pipeline=Pipeline(deps, timeout_seconds=5),
        configs=CommunityConfigCache(
            # The plain and untrusted media filters off: media are judged by HMA alone.
            pg_pool,
            instance_defaults(
                {
                    "PS_HMA_FILTER_ENABLED_BANKS": "csam",
                    "PS_MEDIA_FILTER_MEDIA_TYPES": "",
                    "PS_UNTRUSTED_MEDIA_FILTER_MEDIA_TYPES": "",
                }
            ),
        ),
        writer=writer,
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=5,
        wait_seconds=20,
        settle_early_seconds=settle_early_seconds,
    )
    t = tag()
    slow_id, again_id, text_id, image_id = (f"${uuid.uuid4().hex}" for _ in range(4))
    batch = {
        slow_id: _Event(EvaluationRequest(slow_id, "default", event=image(f"slow-bad{t}"))),
        # Another event with the same media: it joins the scan running for the first.
        again_id: _Event(EvaluationRequest(again_id, "default", event=image(f"slow-bad{t}"))),
        text_id: _Event(EvaluationRequest(text_id, "default", event=message("hi"))),
        image_id: _Event(EvaluationRequest(image_id, "default", event=image(f"img-ok{t}"))),
    }
    answered: dict[str, bytes] = {}
    both_answered = asyncio.Event()

    async def deliver(event_id: str, answer: _Answer) -> None:
        answered[event_id] = answer.reply
        if text_id in answered and image_id in answered:
            both_answered.set()

    try:
        # One batch, as the worker forms it from requests arriving together.
        batch_task = asyncio.ensure_future(service._answer_events(batch, deliver))
        await asyncio.wait_for(both_answered.wait(), 15)
        assert slow_id not in answered  # held by the media server
        assert again_id not in answered
        for event_id in (text_id, image_id):
            verdict = Verdict.from_json(answered[event_id])
            assert verdict.content_class is ContentClass.NEUTRAL
        services.media.release_slow.set()
        await batch_task
        for event_id in (slow_id, again_id):
            slow = Verdict.from_json(answered[event_id])
            assert slow.content_class is ContentClass.PROHIBITED
            assert "error" not in orjson.loads(answered[event_id])
        assert services.media.downloads[f"slow-bad{t}"] == 1
    finally:
        services.media.release_slow.set()
        await service.stop()

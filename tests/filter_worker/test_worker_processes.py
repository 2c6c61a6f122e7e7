"""Two real filter-worker processes on NATS, Redis and PostgreSQL.

One verdict per event ID however many workers are asked how often; configuration
changes reach every worker without restart; bad requests get error replies; a bad
filter setting stops the worker at start.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from tests.filters.filter_helpers import message
from tests.service_processes import ServiceProcess
from warden import redis_keys
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import (
    CONFIG_CHANGED_SUBJECT,
    EVALUATE_SUBJECT,
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_REFERENCE_HASH,
    HEADER_ROOM_VERSION,
    HEADER_SOURCE,
    VERDICT_LOG_STREAM,
    VERDICTS_STREAM,
)
from warden.policy.verdict import ContentClass, Verdict
from warden.storage.communities import create_community, update_community

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def headers(event_id: str, community: str) -> dict[str, str]:
    return {
        HEADER_EVENT_ID: event_id,
        HEADER_COMMUNITY: community,
        HEADER_ROOM_VERSION: "11",
        HEADER_ORIGIN: "origin.example",
        HEADER_SOURCE: "sign",
        HEADER_REFERENCE_HASH: "refhash",
        "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    }


async def evaluate(nc: NATS, body: dict[str, Any] | bytes, hdrs: dict[str, str]) -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    reply = await nc.request(EVALUATE_SUBJECT, data, timeout=20, headers=hdrs)
    return bytes(reply.data)


def metric_sum(workers: list[ServiceProcess], name: str, labels: str) -> float:
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", re.M)
    for w in workers:
        text = httpx.get(f"{w.metrics_url}/metrics", timeout=5).text
        total += sum(float(m) for m in pattern.findall(text))
    return total


async def verdict_stream_marks(js: Any) -> dict[str, int]:
    """Where each verdict stream will put its next message (refusals and moderation
    requests on ``VERDICTS_STREAM``, neutral and allowed verdicts on the log stream)."""
    await ensure_verdicts_stream(js)
    return {
        name: (await js.stream_info(name)).state.last_seq + 1
        for name in (VERDICTS_STREAM, VERDICT_LOG_STREAM)
    }


async def stream_messages_for(nc: NATS, first_seq: dict[str, int], event_id: str) -> list[Any]:
    """The verdict messages for ``event_id`` published since ``verdict_stream_marks``."""
    js = nc.jetstream()
    found = []
    for stream, first in first_seq.items():
        last = (await js.stream_info(stream)).state.last_seq
        for seq in range(first, last + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue
            if (msg.headers or {}).get("Nats-Msg-Id") == event_id:
                found.append(msg)
    return found


async def forbidden_word_community(pool: asyncpg.Pool) -> str:
    """A new community whose keyword filter refuses "forbidden" (no hellbans)."""
    community = f"c-{uuid.uuid4().hex[:8]}"
    await create_community(pool, "test", community_id=community)
    await update_community(
        pool,
        community,
        config={"keyword_filter_keywords": ["forbidden"], "hellban_postfilter_minutes": 0},
    )
    return community


async def test_two_workers_one_verdict_config_changes_and_bad_requests(
    spawn_service: Callable[..., ServiceProcess],
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
) -> None:
    workers = [spawn_service("filter-worker", PS_OTEL_EXPORTER="console") for _ in range(2)]
    community = await forbidden_word_community(pg_pool)
    for w in workers:
        await asyncio.to_thread(w.wait_ready)
    js = nats_client.jetstream()
    first_seq = await verdict_stream_marks(js)

    # --- the same event, many times at once, to both workers ---
    eid = f"${uuid.uuid4().hex}"
    event = message("this is forbidden " + "x" * 600)
    replies = await asyncio.gather(
        *(evaluate(nats_client, event, headers(eid, community)) for _ in range(40))
    )
    assert len(set(replies)) == 1  # identical replies
    verdict = Verdict.from_json(replies[0])
    assert verdict.event_id == eid and verdict.content_class is ContentClass.PROHIBITED
    assert verdict.community_id == community and verdict.origin == "origin.example"
    rows = await pg_pool.fetchval("SELECT count(*) FROM verdicts WHERE event_id = $1", eid)
    assert rows == 1
    assert metric_sum(workers, "warden_evaluations_total", 'outcome="first_time"') == 1
    assert metric_sum(workers, "warden_verdicts_total", 'class="prohibited"') == 1
    published = await stream_messages_for(nats_client, first_seq, eid)
    assert len(published) == 1
    assert published[0].subject == "warden.verdict.prohibited"
    on_stream = orjson.loads(published[0].data)
    assert on_stream["extra"]["source"] == "sign"
    assert on_stream["extra"]["body_excerpt"] == event["content"]["body"][:500]
    assert Verdict.from_dict(on_stream).harms == verdict.harms

    # --- a config change reaches every worker without restart ---
    before = [
        Verdict.from_json(
            await evaluate(
                nats_client, message("zebra"), headers(f"${uuid.uuid4().hex}", community)
            )
        )
        for _ in range(8)
    ]
    assert all(v.content_class is ContentClass.NEUTRAL for v in before)  # both now cached
    await update_community(
        pg_pool,
        community,
        config={"keyword_filter_keywords": ["zebra"], "hellban_postfilter_minutes": 0},
    )
    await nats_client.publish(CONFIG_CHANGED_SUBJECT, orjson.dumps({"community_id": community}))
    await nats_client.flush()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while True:
        after = [
            Verdict.from_json(
                await evaluate(
                    nats_client, message("zebra"), headers(f"${uuid.uuid4().hex}", community)
                )
            )
            for _ in range(8)
        ]
        if all(v.content_class is ContentClass.PROHIBITED for v in after):
            break
        assert loop.time() < deadline, "config change not seen by every worker within 1s"

    # --- bad requests get error replies; the workers keep serving ---
    for body, hdrs in [
        (b"\xff\xfe not json", headers(f"${uuid.uuid4().hex}", community)),
        (b"[]", headers(f"${uuid.uuid4().hex}", community)),
        (orjson.dumps(message("hi")), {}),
        (orjson.dumps(message("hi")), headers(f"${uuid.uuid4().hex}", "no-such-community")),
    ]:
        error = orjson.loads(await evaluate(nats_client, body, hdrs))
        assert set(error) == {"error"} and error["error"]
    ok = Verdict.from_json(
        await evaluate(nats_client, message("fine"), headers(f"${uuid.uuid4().hex}", community))
    )
    assert ok.content_class is ContentClass.NEUTRAL
    assert metric_sum(workers, "warden_evaluations_total", 'outcome="error"') >= 4

    # --- the evaluation was a child of the caller's trace; clean shutdown ---
    for w in workers:
        assert w.stop() == 0
    assert any(TRACE_ID in w.output() for w in workers)


def test_bad_filter_setting_stops_the_worker(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    worker = spawn_service("filter-worker", PS_LENGTH_FILTER_MAX_LENGTH="lots")
    assert worker.proc.wait(timeout=30) == 2
    lines = [ln for ln in worker.output().splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("warden: invalid setting PS_LENGTH_FILTER_MAX_LENGTH")


async def test_neutral_verdicts_reach_jetstream_only_with_the_verdict_log(
    spawn_service: Callable[..., ServiceProcess],
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
) -> None:
    community = await forbidden_word_community(pg_pool)
    js = nats_client.jetstream()

    async def judge(text: str) -> tuple[Verdict, list[Any]]:
        first_seq = await verdict_stream_marks(js)
        eid = f"${uuid.uuid4().hex}"
        verdict = Verdict.from_json(
            await evaluate(nats_client, message(text), headers(eid, community))
        )
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # published at insert, or marked once JetStream acknowledged it
            if await pg_pool.fetchval("SELECT published FROM verdicts WHERE event_id = $1", eid):
                break
            assert asyncio.get_running_loop().time() < deadline, f"{eid} never published"
            await asyncio.sleep(0.05)
        return verdict, await stream_messages_for(nats_client, first_seq, eid)

    # The default: a neutral verdict is only stored; a refusal still reaches JetStream.
    worker = spawn_service("filter-worker")
    await asyncio.to_thread(worker.wait_ready)
    neutral, messages = await judge("zebra")
    assert neutral.content_class is ContentClass.NEUTRAL and messages == []
    refusal, messages = await judge("this is forbidden")
    assert refusal.content_class is ContentClass.PROHIBITED
    assert [m.subject for m in messages] == ["warden.verdict.prohibited"]
    assert worker.stop() == 0

    # With the log, the neutral verdict is published to its stream.
    worker = spawn_service("filter-worker", PS_JETSTREAM_VERDICT_LOG="true")
    await asyncio.to_thread(worker.wait_ready)
    neutral, messages = await judge("zebra")
    assert neutral.content_class is ContentClass.NEUTRAL
    assert [m.subject for m in messages] == ["warden.verdict.neutral"]
    assert orjson.loads(messages[0].data)["extra"]["source"] == "sign"
    assert worker.stop() == 0


async def test_the_worker_keeps_verdicts_in_redis_for_ps_verdict_cache_seconds(
    spawn_service: Callable[..., ServiceProcess],
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    community = await forbidden_word_community(pg_pool)
    worker = spawn_service("filter-worker", PS_VERDICT_CACHE_SECONDS="120")
    await asyncio.to_thread(worker.wait_ready)
    eid = f"${uuid.uuid4().hex}"
    reply = await evaluate(nats_client, message("zebra"), headers(eid, community))
    # Cached right after the reply (the reply does not wait for it).
    async with asyncio.timeout(10):
        while await redis_client.get(redis_keys.verdict(eid)) != reply:
            await asyncio.sleep(0.02)
    assert 60 < await redis_client.ttl(redis_keys.verdict(eid)) <= 120
    assert worker.stop() == 0

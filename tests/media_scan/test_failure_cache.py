"""Media whose scan failed is not downloaded again on every ask (issue 12): a Redis mark
with a TTL (``warden:media_scan_failed:<mxc>``), shared by the workers, against a real
media repository that counts its downloads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.media_scan.conftest import ScannerFactory, Services, tag
from tests.media_scan.test_hma_filter import image, judge, metric, pipeline
from warden import redis_keys
from warden.media_scan.scanner import build_media_scanner
from warden.policy.dependency_failures import EvaluationUnavailable
from warden.policy.verdict import ContentClass
from warden.settings import Settings

NewCommunity = Callable[[], Awaitable[str]]
HITS = "warden_hma_recent_failure_hits_total"


def mark(media_id: str) -> str:
    return redis_keys.media_scan_failed(f"mxc://example.org/{media_id}")


async def test_a_failed_download_is_not_tried_again_until_its_mark_lapses(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    media_id = f"fail-{t}"
    first = pipeline(redis_client, pg_pool, make_scanner(failure_cache_seconds=0.6))
    second = pipeline(redis_client, pg_pool, make_scanner(failure_cache_seconds=0.6))
    community = await new_community()
    hits_before = metric(HITS)

    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(first, image(media_id), community)
    assert "HTTP 500" in raised.value.error
    assert services.media.downloads[media_id] == 1
    ttl_ms = await redis_client.pttl(mark(media_id))
    assert 0 < ttl_ms <= 600
    assert b"HTTP 500" in await redis_client.get(mark(media_id))

    # Retries, on this worker and another one, for this community and another: no
    # download, still no verdict (nothing final is stored from a failure).
    for p, c in ((first, community), (second, community), (second, await new_community())):
        with pytest.raises(EvaluationUnavailable) as raised:
            await judge(p, image(media_id), c)
        assert "HTTP 500" in raised.value.error and "recent failure" in raised.value.error
    assert services.media.downloads[media_id] == 1
    assert metric(HITS) == hits_before + 3
    assert not await pg_pool.fetchval(
        "SELECT count(*) FROM media_classifications WHERE mxc_uri = $1",
        f"mxc://example.org/{media_id}",
    )
    # A community that chose availability still gets its neutral verdict meanwhile.
    verdict = await judge(first, image(media_id), community, hma_fail_secure=False)
    assert verdict.content_class is ContentClass.NEUTRAL
    assert services.media.downloads[media_id] == 1

    # Once the mark lapsed the next ask downloads again (and marks again).
    await asyncio.sleep(0.7)
    with pytest.raises(EvaluationUnavailable):
        await judge(second, image(media_id), community)
    assert services.media.downloads[media_id] == 2
    assert await redis_client.exists(mark(media_id))


async def test_hma_failing_marks_the_media_and_a_later_success_clears_the_mark(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    media_id = f"img-bad{t}"
    p = pipeline(redis_client, pg_pool, make_scanner(failure_cache_seconds=0.5))
    community = await new_community()
    services.hma.fail = True
    with pytest.raises(EvaluationUnavailable):
        await judge(p, image(media_id), community)
    services.hma.fail = False
    # HMA is back, but the media's mark still holds: no download, no hash.
    with pytest.raises(EvaluationUnavailable):
        await judge(p, image(media_id), community)
    assert services.media.downloads[media_id] == 1
    assert services.hma.hashed[f"bad{t}"] == 0
    await asyncio.sleep(0.6)
    verdict = await judge(p, image(media_id), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert services.media.downloads[media_id] == 2
    assert not await redis_client.exists(mark(media_id))


async def test_a_timed_out_scan_marks_the_media(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    media_id = f"slow-{t}"
    p = pipeline(redis_client, pg_pool, make_scanner(timeout_seconds=0.3, failure_cache_seconds=5))
    community = await new_community()
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(media_id), community)
    assert raised.value.error == "timed out after 0.3s"
    # The filter and the (shielded) scan time out together: the scan marks as it ends.
    for _ in range(100):
        if await redis_client.exists(mark(media_id)):
            break
        await asyncio.sleep(0.02)
    assert b"did not finish within 0.3s" in await redis_client.get(mark(media_id))
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(media_id), community)
    assert "did not finish" in raised.value.error
    assert services.media.downloads[media_id] == 1


async def test_too_large_and_unscannable_media_are_downloaded_once(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(
        redis_client, pg_pool, make_scanner(max_bytes=256 * 1024, failure_cache_seconds=60)
    )
    for media_id in (f"big-{t}", f"fat-{t}", f"txt-{t}"):
        for _ in range(2):
            await judge(p, image(media_id), await new_community())
        # Remembered in media_hashes for good (it would be the same again), not marked.
        assert services.media.downloads[media_id] == 1, media_id
        assert not await redis_client.exists(mark(media_id))
    assert services.hma.hashed == {}


async def test_the_setting_reaches_the_scanner(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PS_HMA_API_URL", "http://127.0.0.1:1")
    assert Settings().hma_failure_cache_seconds == 60.0
    monkeypatch.setenv("PS_HMA_FAILURE_CACHE_SECONDS", "12.5")
    scanner = build_media_scanner(Settings(), pg_pool, redis_client)
    assert scanner is not None
    try:
        assert scanner.failure_cache_seconds == 12.5
    finally:
        await scanner.aclose()

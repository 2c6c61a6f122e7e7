"""The HMA media scanning filter against a real HMA service and media repository."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tests.filters.filter_helpers import OWN_USER, config, event, new_event_id
from tests.media_scan.conftest import ScannerFactory, Services, tag
from warden.federation.network_guard import NetworkGuard
from warden.filters.base import FilterDeps
from warden.filters.hma import HmaFilter
from warden.filters.registry import BY_NAME
from warden.media_scan.extract import media_refs
from warden.media_scan.scanner import MediaScanner, build_media_scanner
from warden.policy.dependency_failures import EvaluationUnavailable
from warden.policy.harms import CHILD_SAFETY_CSAM, MEDIA, OTHER, SPAM
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.settings import Settings

NewCommunity = Callable[[], Awaitable[str]]


def image(
    media_id: str, *, thumbnail: str | None = None, msgtype: str = "m.image"
) -> dict[str, Any]:
    """An image message whose media is ``mxc://example.org/<media_id>``."""
    content: dict[str, Any] = {
        "msgtype": msgtype,
        "body": "a picture",
        "url": f"mxc://example.org/{media_id}",
        "info": {"mimetype": "image/png"},
    }
    if thumbnail is not None:
        content["info"]["thumbnail_url"] = f"mxc://example.org/{thumbnail}"
    return event("m.room.message", content)


def pipeline(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, scanner: MediaScanner | None
) -> Pipeline:
    """A pipeline with only the HMA filter, as one worker would run it."""
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id=OWN_USER)
    deps.media_scanner = scanner
    return Pipeline(deps, timeout_seconds=5.0, filters=[HmaFilter])


async def judge(
    p: Pipeline, ev: dict[str, Any], community_id: str, banks: list[str] | None = None, **cfg: Any
) -> Verdict:
    """Evaluate ``ev`` for a community enabling ``banks`` (default: the csam bank)."""
    return await p.evaluate(
        ev,
        event_id=new_event_id(),
        community_id=community_id,
        config=config(hma_filter_enabled_banks=banks or ["csam"], **cfg),
    )


def metric(name: str, **labels: str) -> float:
    """A metric sample's current value (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def stored_scan(pg_pool: asyncpg.Pool, media_id: str) -> Any:
    """The ``media_hashes`` row of ``mxc://example.org/<media_id>``."""
    return await pg_pool.fetchval(
        "SELECT hashes FROM media_hashes WHERE mxc_uri = $1", f"mxc://example.org/{media_id}"
    )


def test_the_filter_is_registered_with_its_keys() -> None:
    assert BY_NAME["hma"] is HmaFilter
    assert not HmaFilter.enabled(config())
    assert HmaFilter.enabled(config(hma_filter_enabled_banks=["csam"]))
    assert HmaFilter.enabled(config({"PS_HMA_FILTER_ENABLED_BANKS": "csam,ncmec"}))
    assert set(HmaFilter.harm_ids) == {SPAM, CHILD_SAFETY_CSAM, MEDIA}


def test_media_of_images_videos_stickers_and_thumbnails_are_scanned() -> None:
    def uris(ev: dict[str, Any]) -> list[str]:
        return [r.uri for r in media_refs(ev["type"], ev["content"])]

    assert uris(image("a", thumbnail="b")) == ["mxc://example.org/a", "mxc://example.org/b"]
    assert uris(image("a", msgtype="m.video")) == ["mxc://example.org/a"]
    assert uris(event("m.sticker", {"url": "mxc://example.org:8448/s"})) == [
        "mxc://example.org:8448/s"
    ]
    assert uris(image("a", thumbnail="a")) == ["mxc://example.org/a"]  # once
    # Not scanned: other msgtypes, http URLs, junk, encrypted media.
    assert uris(image("a", msgtype="m.file")) == []
    assert uris(event("m.room.message", {"msgtype": "m.image", "url": "https://x/a.png"})) == []
    assert uris(event("m.room.message", {"msgtype": "m.image", "url": "mxc://ex ample/a"})) == []
    assert (
        uris(event("m.room.message", {"msgtype": "m.image", "url": "mxc://example.org/../x"})) == []
    )
    encrypted = {"msgtype": "m.image", "file": {"url": "mxc://example.org/enc", "key": {}}}
    assert uris(event("m.room.message", encrypted)) == []


async def test_a_match_in_an_enabled_bank_refuses_with_the_reference_harms(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    community = await new_community()
    hits_before = metric("warden_hma_bank_hits_total", enabled="true")
    p = pipeline(redis_client, pg_pool, make_scanner())
    verdict = await judge(p, image(f"img-bad{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert set(verdict.harms) == {SPAM, CHILD_SAFETY_CSAM, MEDIA}
    assert services.media.downloads[f"img-bad{t}"] == 1
    assert services.media.unauthorised == 0 and services.hma.unauthorised == 0
    assert services.hma.kinds["photo"] == 1
    assert metric("warden_hma_bank_hits_total", enabled="true") == hits_before + 1
    row = await pg_pool.fetchrow(
        "SELECT class, harms, source FROM media_classifications "
        "WHERE mxc_uri = $1 AND community_id = $2",
        f"mxc://example.org/img-bad{t}",
        community,
    )
    assert row is not None and row["class"] == int(ContentClass.PROHIBITED)
    assert CHILD_SAFETY_CSAM in row["harms"] and row["source"] == "hma"

    # Asked again: the community's classification answers, nothing is fetched.
    cached_before = metric("warden_hma_cache_hits_total", layer="classification")
    again = await judge(p, image(f"img-bad{t}"), community)
    assert again.content_class is ContentClass.PROHIBITED
    assert services.media.downloads[f"img-bad{t}"] == 1
    assert sum(services.hma.hashed.values()) == 1
    assert metric("warden_hma_cache_hits_total", layer="classification") == cached_before + 1


async def test_a_match_in_a_bank_the_community_does_not_enable_is_neutral(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    disabled_before = metric("warden_hma_bank_hits_total", enabled="false")
    csam_only = await new_community()
    verdict = await judge(p, image(f"img-grey{t}"), csam_only, ["csam"])
    assert verdict.content_class is ContentClass.NEUTRAL
    assert metric("warden_hma_bank_hits_total", enabled="false") == disabled_before + 1
    # A community that enables that bank is refused, from the same single scan.
    both = await new_community()
    verdict = await judge(p, image(f"img-grey{t}"), both, ["csam", "other"])
    assert verdict.content_class is ContentClass.PROHIBITED
    assert services.media.downloads[f"img-grey{t}"] == 1
    assert services.hma.hashed[f"grey{t}"] == 1


async def test_a_clean_image_with_a_matching_thumbnail_is_refused(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    community = await new_community()
    clean = await judge(p, image(f"img-ok{t}"), community)
    assert clean.content_class is ContentClass.NEUTRAL
    verdict = await judge(p, image(f"img-ok{t}", thumbnail=f"img-bad{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert services.media.downloads[f"img-bad{t}"] == 1


async def test_the_content_type_is_sniffed_from_the_bytes_not_trusted(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    community = await new_community()
    # The event and the server both say image/png; the bytes are an MP4.
    verdict = await judge(p, image(f"vid-bad{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert services.hma.kinds == {"video": 1}
    stored = await stored_scan(pg_pool, f"vid-bad{t}")
    assert '"video/mp4"' in stored
    # HTML served as image/png is neither image nor video: HMA is not asked.
    verdict = await judge(p, image(f"txt-bad{t}"), community)
    assert verdict.content_class is ContentClass.NEUTRAL
    assert services.hma.hashed[f"bad{t}"] == 1


async def test_one_download_for_one_mxc_asked_by_two_communities_on_two_workers(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    media_id = f"slow-bad{t}"
    # Two workers: each its own scanner, Redis connection and pipeline.
    worker_a = pipeline(redis_client, pg_pool, make_scanner())
    worker_b = pipeline(redis_client, pg_pool, make_scanner())
    first, second = await new_community(), await new_community()
    replica_before = metric("warden_hma_cache_hits_total", layer="replica")
    a = asyncio.ensure_future(judge(worker_a, image(media_id), first))
    b = asyncio.ensure_future(judge(worker_b, image(media_id), second))
    for _ in range(500):  # until one of them is downloading (held by the server)
        if services.media.downloads[media_id]:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # let the other reach the claim
    services.media.release_slow.set()
    verdicts = await asyncio.gather(a, b)
    assert [v.content_class for v in verdicts] == [ContentClass.PROHIBITED] * 2
    assert services.media.downloads[media_id] == 1
    assert services.hma.hashed[f"bad{t}"] == 1
    assert metric("warden_hma_cache_hits_total", layer="replica") == replica_before + 1
    communities = await pg_pool.fetch(
        "SELECT community_id FROM media_classifications WHERE mxc_uri = $1",
        f"mxc://example.org/{media_id}",
    )
    assert {r["community_id"] for r in communities} == {first, second}


async def test_concurrent_asks_in_one_process_share_one_scan(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    media_id = f"slow-ok{t}"
    p = pipeline(redis_client, pg_pool, make_scanner())
    communities = [await new_community() for _ in range(3)]
    shared_before = metric("warden_hma_cache_hits_total", layer="in_flight")
    tasks = [asyncio.ensure_future(judge(p, image(media_id), c)) for c in communities]
    for _ in range(500):
        if services.media.downloads[media_id]:
            break
        await asyncio.sleep(0.01)
    services.media.release_slow.set()
    verdicts = await asyncio.gather(*tasks)
    assert all(v.content_class is ContentClass.NEUTRAL for v in verdicts)
    assert services.media.downloads[media_id] == 1
    assert metric("warden_hma_cache_hits_total", layer="in_flight") == shared_before + 2


async def test_a_failed_download_gives_no_verdict_and_stores_nothing(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    community = await new_community()
    failed_before = metric("warden_hma_scans_total", result="failed")
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(f"fail-{t}"), community)
    assert raised.value.filter_name == "hma" and "HTTP 500" in raised.value.error
    assert metric("warden_hma_scans_total", result="failed") == failed_before + 1
    assert await stored_scan(pg_pool, f"fail-{t}") is None
    assert not await pg_pool.fetchval(
        "SELECT count(*) FROM media_classifications WHERE mxc_uri = $1",
        f"mxc://example.org/fail-{t}",
    )
    # Asked again it is tried again (nothing was remembered from the failure).
    with pytest.raises(EvaluationUnavailable):
        await judge(p, image(f"fail-{t}"), community)
    assert services.media.downloads[f"fail-{t}"] == 2
    # A community that chose availability gets a neutral verdict instead.
    verdict = await judge(p, image(f"fail-{t}"), community, hma_fail_secure=False)
    assert verdict.content_class is ContentClass.NEUTRAL
    assert verdict.filters[0].error is not None


async def test_hma_failing_gives_no_verdict_until_it_answers(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    community = await new_community()
    services.hma.fail = True
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(f"img-bad{t}"), community)
    assert "HTTP 503" in raised.value.error
    assert await stored_scan(pg_pool, f"img-bad{t}") is None
    services.hma.fail = False
    verdict = await judge(p, image(f"img-bad{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    # A wrong API key is a failure too, never a clean scan.
    wrong = pipeline(redis_client, pg_pool, make_scanner(hma_key="wrong"))
    with pytest.raises(EvaluationUnavailable):
        await judge(wrong, image(f"img-ok{t}"), community)
    assert services.hma.unauthorised == 1


async def test_a_slow_scan_times_out_with_its_own_timeout_and_gives_no_verdict(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner(timeout_seconds=0.3))
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(f"slow-{t}"), await new_community())
    # The HMA timeout, not the pipeline's 5 s.
    assert raised.value.error == "timed out after 0.3s"
    assert await stored_scan(pg_pool, f"slow-{t}") is None


async def test_a_slow_scan_does_not_stall_other_events(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    community = await new_community()
    slow = asyncio.ensure_future(judge(p, image(f"slow-{t}"), community))
    for _ in range(500):
        if services.media.downloads[f"slow-{t}"]:
            break
        await asyncio.sleep(0.01)
    text = await judge(p, event("m.room.message", {"msgtype": "m.text", "body": "hi"}), community)
    other_image = await judge(p, image(f"img-ok{t}"), community)
    assert text.content_class is ContentClass.NEUTRAL
    assert other_image.content_class is ContentClass.NEUTRAL
    assert not slow.done()  # still held by the media server
    services.media.release_slow.set()
    assert (await slow).content_class is ContentClass.NEUTRAL


async def test_oversized_media_is_not_scanned_and_counts_as_the_filter_failing(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner(max_bytes=256 * 1024))
    community = await new_community()
    too_large_before = metric("warden_hma_scans_total", result="too_large")
    # Streamed without a length: the download stops past the limit.
    verdict = await judge(p, image(f"big-{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert set(verdict.harms) == {OTHER}
    assert "over the 262144-byte limit" in (verdict.filters[0].error or "")
    assert metric("warden_hma_scans_total", result="too_large") == too_large_before + 1
    assert services.hma.hashed == {}
    # Remembered: another community's ask downloads nothing again.
    other = await judge(p, image(f"big-{t}"), await new_community(), hma_fail_secure=False)
    assert other.content_class is ContentClass.NEUTRAL
    assert services.media.downloads[f"big-{t}"] == 1
    # A declared length over the limit is refused before the body is read.
    verdict = await judge(p, image(f"fat-{t}"), community)
    assert "over the 262144-byte limit" in (verdict.filters[0].error or "")
    assert services.hma.hashed == {}


async def test_redirects_are_followed_on_the_same_host_only(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    p = pipeline(redis_client, pg_pool, make_scanner())
    community = await new_community()
    verdict = await judge(p, image(f"hop-bad{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert services.media.downloads[f"img-bad{t}"] == 1
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(f"away-{t}"), community)
    assert "another host" in raised.value.error
    assert sum(services.other_media.downloads.values()) == 0
    assert services.other_media.unauthorised == 0  # the token never went there


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_media_host_at_a_private_address_is_refused(
    host: str,
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    settings = Settings()  # the default denied networks
    guard = NetworkGuard(
        settings.homeserver_media_client_allowed_networks,
        settings.homeserver_media_client_denied_networks,
    )
    url = f"http://{host}:{services.media_server.port}"
    p = pipeline(redis_client, pg_pool, make_scanner(guard=guard, media_url=url))
    with pytest.raises(EvaluationUnavailable) as raised:
        await judge(p, image(f"img-{tag()}"), await new_community())
    assert "not an allowed" in raised.value.error
    assert sum(services.media.downloads.values()) == 0


async def test_without_an_hma_url_the_filter_does_nothing(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, new_community: NewCommunity
) -> None:
    assert build_media_scanner(Settings(), pg_pool, redis_client) is None
    verdict = await judge(
        pipeline(redis_client, pg_pool, None), image("img-x"), await new_community()
    )
    assert verdict.content_class is ContentClass.NEUTRAL


async def test_settings_build_a_scanner_with_policyserv_names(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PS_HMA_API_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("PS_HMA_API_KEY", "k")
    monkeypatch.setenv("PS_HOMESERVER_MEDIA_CLIENT_URL", "http://127.0.0.1:2")
    monkeypatch.setenv("PS_HOMESERVER_MEDIA_CLIENT_ACCESS_TOKEN", "t")
    monkeypatch.setenv("PS_HMA_MAX_MEDIA_BYTES", "2048")
    monkeypatch.setenv("PS_HMA_TIMEOUT_SECONDS", "7")
    settings = Settings()
    assert "'k'" not in repr(settings) and "'t'" not in repr(settings)
    scanner = build_media_scanner(settings, pg_pool, redis_client)
    assert scanner is not None
    try:
        assert scanner.timeout_seconds == 7.0
        assert scanner.downloader.max_bytes == 2048
        assert scanner.hma.base_url == "http://127.0.0.1:1"
        assert scanner.downloader.base_url == "http://127.0.0.1:2"
    finally:
        await scanner.aclose()


def test_policyserv_hma_settings_are_read_not_warned_about() -> None:
    from warden.policyserv_settings import ignored_settings_in

    env = {
        "PS_HMA_API_URL": "http://hma",
        "PS_HMA_API_KEY": "k",
        "PS_HMA_FILTER_ENABLED_BANKS": "csam",
        "PS_HOMESERVER_MEDIA_CLIENT_URL": "http://hs",
        "PS_HOMESERVER_MEDIA_CLIENT_ACCESS_TOKEN": "t",
    }
    assert list(ignored_settings_in(env)) == []


def test_the_wait_for_another_workers_verdict_covers_the_hma_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    from warden_filter_worker.main import claim_timing

    _, without = claim_timing(make_settings(hma_timeout_seconds=60.0))
    assert without == 25.0  # HMA off: its timeout changes nothing
    ttl, wait = claim_timing(make_settings(hma_api_url="http://hma", hma_timeout_seconds=60.0))
    assert wait == 25.0 + 55.0  # the main group's 5 s became 60 s
    assert ttl * 3 <= wait


async def test_an_imported_policyserv_judgement_is_used_without_a_download(
    services: Services,
    make_scanner: ScannerFactory,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    new_community: NewCommunity,
) -> None:
    t = tag()
    community = await new_community()
    for media_id, source in ((f"img-ok{t}", "policyserv_import"), (f"img-ok2{t}", "other")):
        await pg_pool.execute(
            "INSERT INTO media_classifications "
            "(mxc_uri, community_id, class, harms, source, classified_ts) "
            "VALUES ($1, $2, $3, $4, $5, 1)",
            f"mxc://example.org/{media_id}",
            community,
            int(ContentClass.PROHIBITED),
            [CHILD_SAFETY_CSAM],
            source,
        )
    p = pipeline(redis_client, pg_pool, make_scanner())
    verdict = await judge(p, image(f"img-ok{t}"), community)
    assert verdict.content_class is ContentClass.PROHIBITED
    assert services.media.downloads[f"img-ok{t}"] == 0
    # A row some other scanner wrote is not an HMA judgement: the media is scanned.
    verdict = await judge(p, image(f"img-ok2{t}"), community)
    assert verdict.content_class is ContentClass.NEUTRAL
    assert services.media.downloads[f"img-ok2{t}"] == 1

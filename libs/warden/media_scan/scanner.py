"""Scanning media with HMA: each mxc downloaded and hashed once, judged per community.

Layers, cheapest first:

1. ``media_classifications`` (mxc, community): this community's judgement of the media,
   kept like policyserv's (a later change of ``hma_filter_enabled_banks`` applies to
   media the community has not judged yet).
2. ``media_hashes`` (mxc): what the one download, hash and lookup found (the content
   type sniffed from the bytes, the hashes, the banks they matched), for every community.
3. In-process single-flight: concurrent asks for one mxc in a process share one task.
4. Across replicas, a Redis claim (``warden:media_scan_claim:<mxc>``): the holder
   downloads; the others wait for its row in ``media_hashes``. A holder that failed
   releases the claim and the next asker tries; a crashed one's claim lapses.

Nothing final is stored from a failure: a failed or timed-out scan raises
``DependencyUnavailable``. The replica that failed marks the media in Redis
(``warden:media_scan_failed:<mxc>``, TTL ``PS_HMA_FAILURE_CACHE_SECONDS``) so that the
retries of its senders do not download it again meanwhile: until the mark lapses every
ask raises ``DependencyUnavailable`` at once, then the next ask scans again. Media over
the size limit is remembered as such in ``media_hashes`` (it would be over it again)
and raises ``MediaTooLarge``; bytes of no scannable type are remembered too.
The content type is sniffed from the bytes (``filetype``): neither the event's
``info.mimetype`` nor the homeserver's ``Content-Type`` is trusted. Bytes that are
neither an image nor a video are not sent to HMA (nothing in a bank could match them).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import filetype  # type: ignore[import-untyped]
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from warden import redis_keys
from warden.media_scan.download import MediaDownloader, MediaTooLarge
from warden.media_scan.extract import MediaRef
from warden.media_scan.hma import HmaClient, MediaKind
from warden.policy import slow_lane
from warden.policy.dependency_failures import DependencyUnavailable
from warden.policy.verdict import ContentClass
from warden.settings import Settings

logger = logging.getLogger(__name__)

SOURCE = "hma"  # media_classifications.source of this scanner's rows
# Rows that are HMA judgements: ours and policyserv's (whose only media scanner was HMA).
_CACHED_SOURCES = (SOURCE, "policyserv_import")

SCANS = Counter(
    "warden_hma_scans_total",
    "Media downloaded and scanned with HMA (once per mxc across replicas), by result: "
    "matched (some bank), clean, unscannable (neither image nor video), too_large, failed.",
    ["result"],
)
CACHE_HITS = Counter(
    "warden_hma_cache_hits_total",
    "Media judgements answered without a download, by layer: classification (this "
    "community's), hashes (another community's scan), in_flight (shared a scan running "
    "in this process), replica (waited for another replica's scan).",
    ["layer"],
)
BANK_HITS = Counter(
    "warden_hma_bank_hits_total",
    "Banks matched by media a community judged, by whether the community enables the bank.",
    ["enabled"],
)
RECENT_FAILURES = Counter(
    "warden_hma_recent_failure_hits_total",
    "Media judgements answered 'no verdict' without a download because the media's scan "
    "failed less than PS_HMA_FAILURE_CACHE_SECONDS ago.",
)
DOWNLOAD_BYTES = Histogram(
    "warden_hma_download_bytes",
    "Size of media downloaded for HMA scanning.",
    buckets=(1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8),
)
SCAN_SECONDS = Histogram(
    "warden_hma_scan_seconds",
    "Time to download, hash and look up one piece of media.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class ScanResult:
    """What scanning one piece of media found (the ``media_hashes`` row)."""

    content_type: str
    size: int
    hashes: dict[str, str]
    banks: tuple[str, ...]
    too_large: bool = False

    def to_json(self) -> bytes:
        """The row's JSONB value."""
        return orjson.dumps(
            {
                "content_type": self.content_type,
                "bytes": self.size,
                "hashes": self.hashes,
                "banks": list(self.banks),
                "too_large": self.too_large,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ScanResult:
        """Read a row's JSONB value back."""
        data: dict[str, Any] = orjson.loads(raw)
        return cls(
            content_type=str(data.get("content_type", "")),
            size=int(data.get("bytes", 0)),
            hashes={str(k): str(v) for k, v in dict(data.get("hashes") or {}).items()},
            banks=tuple(str(b) for b in data.get("banks") or ()),
            too_large=bool(data.get("too_large", False)),
        )


def media_kind(content_type: str) -> MediaKind | None:
    """HMA's multipart field for a sniffed type: ``video`` or ``photo`` (None: neither)."""
    if content_type.startswith("video/"):
        return "video"
    if content_type.startswith("image/"):
        return "photo"
    return None


def sniff(data: bytes) -> str:
    """The MIME type the bytes' signature says ("" when unknown)."""
    guessed = filetype.guess_mime(data[:8192])
    return guessed if isinstance(guessed, str) else ""


class RecentlyFailed(DependencyUnavailable):
    """The media's scan failed a short while ago; it is not tried again yet."""


@dataclass
class _InFlight:
    """One mxc's scan running in this process, and the evaluations waiting on it."""

    task: asyncio.Task[ScanResult] | None = None
    # The askers' slow-lane callbacks, called once the scan goes outside (a download,
    # HMA, or waiting on another replica's scan); later askers are told at once.
    askers: list[slow_lane.Mark] = field(default_factory=list)
    outside: bool = False

    def ask(self, mark: slow_lane.Mark | None) -> None:
        if mark is None:
            return
        if self.outside:
            mark()
        else:
            self.askers.append(mark)

    def going_outside(self) -> None:
        self.outside = True
        askers, self.askers = self.askers, []
        for mark in askers:
            mark()


class MediaScanner:
    """Judges media for communities; one per process, shared by every event."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        downloader: MediaDownloader,
        hma: HmaClient,
        *,
        timeout_seconds: float,
        failure_cache_seconds: float = 0.0,
        poll_seconds: float = 0.1,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.downloader = downloader
        self.hma = hma
        self.timeout_seconds = timeout_seconds
        self.failure_cache_seconds = failure_cache_seconds
        self._poll = poll_seconds
        self._claim_ms = max(1000, int(timeout_seconds * 1000))
        self._release = redis.register_script(_RELEASE)
        self._inflight: dict[str, _InFlight] = {}

    async def aclose(self) -> None:
        """Close the HTTP clients."""
        await self.downloader.aclose()
        await self.hma.aclose()

    async def classify(
        self, ref: MediaRef, community_id: str, enabled_banks: Iterable[str], harms: tuple[str, ...]
    ) -> tuple[ContentClass, tuple[str, ...]]:
        """The community's judgement of the media: prohibited with ``harms`` when it
        matched one of ``enabled_banks``, else neutral. Raises ``DependencyUnavailable``
        when the scan failed, ``MediaTooLarge`` for media over the limit."""
        row = await self.pool.fetchrow(
            "SELECT class, harms FROM media_classifications "
            "WHERE mxc_uri = $1 AND community_id = $2 AND source = ANY($3::text[])",
            ref.uri,
            community_id,
            list(_CACHED_SOURCES),
        )
        if row is not None:
            CACHE_HITS.labels("classification").inc()
            return ContentClass(row["class"]), tuple(row["harms"])
        result = await self.scan(ref)
        if result.too_large:
            raise MediaTooLarge(result.size, self.downloader.max_bytes)
        enabled = set(enabled_banks)
        matched = [bank for bank in result.banks if bank in enabled]
        for bank in result.banks:
            BANK_HITS.labels("true" if bank in enabled else "false").inc()
        content_class = ContentClass.PROHIBITED if matched else ContentClass.NEUTRAL
        found = harms if matched else ()
        # Only for a community that exists (the row references it); a race with its
        # deletion just leaves nothing cached.
        await self.pool.execute(
            "INSERT INTO media_classifications "
            "(mxc_uri, community_id, class, harms, source, classified_ts) "
            "SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM communities WHERE id = $2) "
            "ON CONFLICT DO NOTHING",
            ref.uri,
            community_id,
            int(content_class),
            list(found),
            SOURCE,
            int(time.time() * 1000),
        )
        return content_class, found

    async def scan(self, ref: MediaRef) -> ScanResult:
        """What the media's one scan found, scanning it unless some process did."""
        scan = self._inflight.get(ref.uri)
        if scan is None:
            scan = _InFlight()
            self._inflight[ref.uri] = scan
            task = scan.task = asyncio.create_task(self._scan_once(ref, scan))
            task.add_done_callback(lambda done: self._forget(ref.uri, done))
        else:
            CACHE_HITS.labels("in_flight").inc()
        scan.ask(slow_lane.current())
        assert scan.task is not None
        # Shielded: one asker's timeout must not cancel the scan others wait for. The
        # scan bounds itself with the same timeout.
        return await asyncio.shield(scan.task)

    def _forget(self, uri: str, task: asyncio.Task[ScanResult]) -> None:
        scan = self._inflight.get(uri)
        if scan is not None and scan.task is task:
            del self._inflight[uri]
        if not task.cancelled():
            task.exception()  # retrieved even when every asker gave up

    async def _load(self, uri: str) -> ScanResult | None:
        raw = await self.pool.fetchval("SELECT hashes FROM media_hashes WHERE mxc_uri = $1", uri)
        return None if raw is None else ScanResult.from_json(raw)

    async def _scan_once(self, ref: MediaRef, scan: _InFlight) -> ScanResult:
        uri = ref.uri
        failed = redis_keys.media_scan_failed(uri)
        async with asyncio.timeout(self.timeout_seconds):
            cached = await self._load(uri)
            if cached is not None:
                CACHE_HITS.labels("hashes").inc()
                return cached
            await self._raise_if_recently_failed(failed)
            # From here on it downloads, or waits for the replica that does.
            scan.going_outside()
            claim = redis_keys.media_scan_claim(uri)
            token = secrets.token_hex(16)
            while True:
                if await self.redis.set(claim, token, nx=True, px=self._claim_ms):
                    try:
                        return await self._scan_claimed(ref)
                    except (DependencyUnavailable, asyncio.CancelledError) as exc:
                        # Marked before the claim goes, so that the replicas waiting on
                        # it see the mark instead of downloading in turn. Cancelled: the
                        # timeout above (the scan task is shielded from its askers).
                        await self._mark_failed(failed, exc)
                        raise
                    finally:
                        await self._release_claim(claim, token)
                # Another replica is scanning it: wait for its result, or for its claim
                # to go (it failed or died), then try ourselves unless it marked the
                # media as failing.
                while await self.redis.exists(claim):
                    await asyncio.sleep(self._poll)
                    cached = await self._load(uri)
                    if cached is not None:
                        CACHE_HITS.labels("replica").inc()
                        return cached
                cached = await self._load(uri)
                if cached is not None:
                    CACHE_HITS.labels("replica").inc()
                    return cached
                await self._raise_if_recently_failed(failed)

    async def _raise_if_recently_failed(self, key: str) -> None:
        """``RecentlyFailed`` while the media's failure mark lives."""
        if self.failure_cache_seconds <= 0:
            return
        why = await self.redis.get(key)
        if why is None:
            return
        RECENT_FAILURES.inc()
        reason = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise RecentlyFailed(f"{reason} (a recent failure; not tried again yet)")

    async def _mark_failed(self, key: str, exc: BaseException) -> None:
        """Mark the media as failing for ``failure_cache_seconds`` (best effort)."""
        if self.failure_cache_seconds <= 0:
            return
        if isinstance(exc, asyncio.CancelledError):
            reason = f"the scan did not finish within {self.timeout_seconds:g}s"
        else:
            reason = str(exc) or type(exc).__name__
        try:
            await self.redis.set(key, reason[:200], px=int(self.failure_cache_seconds * 1000))
        except Exception as err:  # only the retries' cost depends on it
            logger.warning("could not mark a failed media scan", extra={"error": str(err)})

    async def _scan_claimed(self, ref: MediaRef) -> ScanResult:
        """Scan under this process's claim; the result goes to ``media_hashes``."""
        uri = ref.uri
        cached = await self._load(uri)  # finished just before our claim
        if cached is not None:
            CACHE_HITS.labels("replica").inc()
            return cached
        result = await self._download_and_hash(ref)
        await self.pool.execute(
            "INSERT INTO media_hashes (mxc_uri, hashes, ts) VALUES ($1, $2, $3) "
            "ON CONFLICT (mxc_uri) DO NOTHING",
            uri,
            result.to_json().decode("utf-8"),
            int(time.time() * 1000),
        )
        # A success clears an older mark (it lapsed, or a retry after it got through).
        if self.failure_cache_seconds > 0:
            await self.redis.delete(redis_keys.media_scan_failed(uri))
        return result

    async def _release_claim(self, claim: str, token: str) -> None:
        try:
            await self._release(keys=[claim], args=[token])
        except Exception as exc:  # it lapses by itself
            logger.warning("could not release a media scan claim", extra={"error": str(exc)})

    async def _download_and_hash(self, ref: MediaRef) -> ScanResult:
        start = time.perf_counter()
        try:
            try:
                data = (await self.downloader.download(ref)).data
            except MediaTooLarge as exc:
                SCANS.labels("too_large").inc()
                return ScanResult("", exc.size, {}, (), too_large=True)
            DOWNLOAD_BYTES.observe(len(data))
            content_type = sniff(data)
            kind = media_kind(content_type)
            if kind is None:
                SCANS.labels("unscannable").inc()
                return ScanResult(content_type, len(data), {}, ())
            hashes = await self.hma.hash(data, kind, content_type)
            banks = await self.hma.banks_matching(hashes) if hashes else []
        except BaseException as exc:
            SCANS.labels("failed").inc()
            if not isinstance(exc, DependencyUnavailable | TimeoutError | asyncio.CancelledError):
                logger.warning("media scan failed", extra={"error": type(exc).__name__})
            raise
        finally:
            SCAN_SECONDS.observe(time.perf_counter() - start)
        SCANS.labels("matched" if banks else "clean").inc()
        return ScanResult(content_type, len(data), hashes, tuple(banks))


def build_media_scanner(
    settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis
) -> MediaScanner | None:
    """The process's scanner from the settings; None when ``PS_HMA_API_URL`` is empty."""
    from warden.federation.network_guard import NetworkGuard

    if not settings.hma_api_url:
        return None
    guard = NetworkGuard(
        settings.homeserver_media_client_allowed_networks,
        settings.homeserver_media_client_denied_networks,
    )
    downloader = MediaDownloader(
        settings.homeserver_media_client_url,
        settings.homeserver_media_client_access_token,
        guard,
        max_bytes=settings.hma_max_media_bytes,
        timeout_seconds=settings.hma_timeout_seconds,
    )
    hma = HmaClient(
        settings.hma_api_url, settings.hma_api_key, timeout_seconds=settings.hma_timeout_seconds
    )
    return MediaScanner(
        pool,
        redis,
        downloader,
        hma,
        timeout_seconds=settings.hma_timeout_seconds,
        failure_cache_seconds=settings.hma_failure_cache_seconds,
    )

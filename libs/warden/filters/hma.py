"""HMA media scanning filter: refuses media that matched one of the community's HMA banks.

Images, videos and stickers (``content.url`` and ``content.info.thumbnail_url``, mxc
only; encrypted media are skipped) are downloaded once through the homeserver's
authenticated media API and hashed and looked up with HMA (``warden.media_scan``).
A match in a bank of ``hma_filter_enabled_banks`` refuses the event with policyserv's
harms (every bank is assumed to mean CSAM, as policyserv does).

Instance settings: ``PS_HMA_API_URL`` (empty: the filter does nothing), ``PS_HMA_API_KEY``,
``PS_HOMESERVER_MEDIA_CLIENT_URL``, ``PS_HOMESERVER_MEDIA_CLIENT_ACCESS_TOKEN``,
``PS_HMA_MAX_MEDIA_BYTES``, ``PS_HMA_TIMEOUT_SECONDS`` (this filter's timeout instead of
``PS_FILTER_TIMEOUT_SECONDS``). A scan that fails or times out gives no verdict (the
event is judged again on the next ask) unless the community set ``hma_fail_secure`` to
false; media over the size limit count as a failure of the filter (refused, harm
``other``, unless ``hma_fail_secure`` is false).
"""

from __future__ import annotations

import asyncio

from warden.filters.base import Filter, FilterContext, FilterDeps, FilterResult, Group
from warden.media_scan.extract import media_refs
from warden.policy.config import ConfigKey, EffectiveConfig, declare
from warden.policy.harms import CHILD_SAFETY_CSAM, MEDIA, SPAM
from warden.policy.verdict import ContentClass

(ENABLED_BANKS,) = declare(
    ConfigKey(
        "hma_filter_enabled_banks",
        "list[str]",
        [],
        "HMA bank names whose matches refuse media (images, videos, stickers and their "
        "thumbnails). Empty disables the HMA filter; PS_HMA_API_URL must be set too.",
    ),
)

HARMS = (SPAM, CHILD_SAFETY_CSAM, MEDIA)


class HmaFilter(Filter):
    """Prohibits media that one of the community's enabled HMA banks matched."""

    name = "hma"
    group = Group.MAIN
    harm_ids = HARMS

    @classmethod
    def enabled(cls, config: EffectiveConfig) -> bool:
        """On while the community enables some bank."""
        return bool(config.get_list(ENABLED_BANKS.name))

    def timeout_seconds(self, deps: FilterDeps, default: float) -> float:
        """``PS_HMA_TIMEOUT_SECONDS``: downloads and hashing take longer than text checks."""
        scanner = deps.media_scanner
        return default if scanner is None else scanner.timeout_seconds

    async def check(self, ctx: FilterContext) -> FilterResult:
        """Prohibited (spam, CSAM, media) when any of the event's media matched."""
        scanner = ctx.deps.media_scanner
        if scanner is None:
            return FilterResult.neutral()  # PS_HMA_API_URL is not set
        refs = media_refs(ctx.event_type, ctx.content)
        if not refs:
            return FilterResult.neutral()
        banks = ctx.config.get_list(ENABLED_BANKS.name)
        judged = await asyncio.gather(
            *(scanner.classify(ref, ctx.community_id, banks, HARMS) for ref in refs)
        )
        harms = [h for cls, found in judged if cls is ContentClass.PROHIBITED for h in found]
        if harms:
            return FilterResult.prohibited(*dict.fromkeys(harms))
        return FilterResult.neutral()

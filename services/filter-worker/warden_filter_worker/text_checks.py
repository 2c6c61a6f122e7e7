"""Text checks for the server-centric API (``/_policyserv/v1/check/text``).

The gateway sends a text on ``CHECK_TEXT_SUBJECT`` (queue group
``FILTER_WORKERS_QUEUE``, header ``HEADER_COMMUNITY``); a worker runs the community's
text-capable filters (``Filter.checks_text``) over it and replies ``{"harms": [...]}``
(empty: allowed) or ``{"error": "..."}``.

The text is judged as the body of an ``m.text`` ``m.room.message`` sent by Warden's own
user, so the filters need no second code path. Only text-capable filters run (no
prefilters, no hellbans, no frequency counts), and nothing is stored, cached or
published: a text check has no side effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from warden.bus.subjects import CHECK_TEXT_SUBJECT, HEADER_COMMUNITY
from warden.filters.base import Filter, FilterDeps
from warden.policy.dependency_failures import EvaluationUnavailable
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass
from warden_filter_worker.community_config import CommunityConfigCache, UnknownCommunity
from warden_filter_worker.queue_responder import QueueResponder

logger = logging.getLogger(__name__)

TEXT_CHECKS = Counter(
    "warden_text_checks_total",
    "Text checks answered by this worker, by outcome (allowed, refused, unavailable: a "
    "filter's dependency failed, error: a bad request or unknown community).",
    ["outcome"],
)
TEXT_CHECK_SECONDS = Histogram(
    "warden_text_check_seconds",
    "Time a worker took to judge one text.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Texts judged at once per worker; NATS buffers the rest (and the gateway times out).
MAX_IN_FLIGHT = 64
# The event ID filters see (logs, outcomes): a text has none.
TEXT_EVENT_ID = "$text-check"


def text_filters() -> tuple[type[Filter], ...]:
    """The registered filters that judge text alone, in pipeline order."""
    from warden.filters.registry import FILTERS

    return tuple(f for f in FILTERS if f.checks_text)


class TextCheckService(QueueResponder):
    """Answers text checks with the text-capable filters, in the workers' queue group."""

    what = "text checks"

    def __init__(
        self,
        *,
        deps: FilterDeps,
        configs: CommunityConfigCache,
        timeout_seconds: float,
        filters: Iterable[type[Filter]] | None = None,
    ) -> None:
        self._configs = configs
        self._local_user_id = deps.local_user_id
        self._pipeline = Pipeline(
            deps,
            timeout_seconds=timeout_seconds,
            filters=text_filters() if filters is None else filters,
        )
        super().__init__(MAX_IN_FLIGHT)

    async def start(self, nc: NATS, subject: str = CHECK_TEXT_SUBJECT) -> None:
        """Join the workers' queue group on ``subject`` (tests use one of their own)."""
        await self.subscribe(nc, subject)

    async def _answer(self, msg: Msg) -> None:
        start = time.perf_counter()
        outcome, reply = await self._judge(msg)
        TEXT_CHECKS.labels(outcome).inc()
        TEXT_CHECK_SECONDS.observe(time.perf_counter() - start)
        if msg.reply:
            try:
                await msg.respond(reply)
            except Exception as exc:  # the gateway gave up or NATS closed: nobody waits
                logger.warning("text check reply failed", extra={"error": str(exc)})

    async def check(self, community_id: str, text: str) -> list[str]:
        """The harms the community's text filters find in ``text`` (empty: allowed).

        Raises ``UnknownCommunity`` and ``EvaluationUnavailable``.
        """
        config = await self._configs.get(community_id)
        event = {
            "type": "m.room.message",
            "sender": self._local_user_id,
            "room_id": "",
            "content": {"msgtype": "m.text", "body": text},
        }
        verdict = await self._pipeline.evaluate(
            event, event_id=TEXT_EVENT_ID, community_id=community_id, config=config
        )
        if verdict.content_class is not ContentClass.PROHIBITED:
            return []
        return list(verdict.harms)

    async def _judge(self, msg: Msg) -> tuple[str, bytes]:
        community_id = (msg.headers or {}).get(HEADER_COMMUNITY, "")
        if not community_id:
            return "error", orjson.dumps({"error": "missing community header"})
        try:
            text = msg.data.decode("utf-8")
        except UnicodeDecodeError:
            return "error", orjson.dumps({"error": "text is not UTF-8"})
        try:
            harms = await self.check(community_id, text)
        except UnknownCommunity:
            return "error", orjson.dumps({"error": "unknown community"})
        except EvaluationUnavailable as exc:
            return "unavailable", orjson.dumps({"error": str(exc)})
        except Exception as exc:  # PostgreSQL down while loading the config, say
            logger.warning("text check failed", extra={"error": repr(exc)})
            return "unavailable", orjson.dumps({"error": "text check failed"})
        return ("refused" if harms else "allowed"), orjson.dumps({"harms": harms})

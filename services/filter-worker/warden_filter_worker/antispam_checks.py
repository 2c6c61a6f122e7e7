"""Homeserver spam checks: events the gateway built from spam-checker callbacks.

The gateway's ``/_warden/antispam/v1`` turns a callback that is not itself an event (an
invite, a join, a room creation, a login, a user name) into the event it stands for and
sends it on ``ANTISPAM_CHECK_SUBJECT`` (queue group ``FILTER_WORKERS_QUEUE``). A worker
judges it with the community's filters and replies ``{"harms": [...]}`` (empty:
allowed) or ``{"error": "..."}``. Three kinds (header ``HEADER_ANTISPAM_KIND``):

- ``event``: every filter of the pipeline, as ``/sign`` has them (policy lists, invite
  and join rates, frequency, the content filters, the hellban prefilter), except the
  hellban postfilter: a refused action does not hellban whoever attempted it;
- ``username``: the user-ID filters and the text-capable filters, over an ``m.text``
  message whose sender is the user and whose body is the display name;
- ``publish_room``: as ``event`` (the publisher's policy-list bans), then, if that
  allowed it, the room's name and topic from the learned room state through the
  text-capable filters (as an ``m.text`` message of the publisher whose body is the
  name and topic). A room Warden has learned no state of (it is not in it) has no name
  or topic to judge.

The homeserver's token vouches for the sender, so the event counts in rate windows
(by ``HEADER_EVENT_ID``). Nothing is stored or published: the verdict is the answer,
recorded by the gateway's metrics and logs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from warden.bus.subjects import (
    ANTISPAM_CHECK_SUBJECT,
    HEADER_ANTISPAM_KIND,
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
)
from warden.filters.base import Filter, FilterDeps
from warden.policy.config import EffectiveConfig
from warden.policy.dependency_failures import EvaluationUnavailable
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import ContentClass, Verdict
from warden.storage import room_state
from warden_filter_worker.community_config import CommunityConfigCache, UnknownCommunity
from warden_filter_worker.queue_responder import QueueResponder
from warden_filter_worker.text_checks import text_filters

logger = logging.getLogger(__name__)

KIND_EVENT = "event"
KIND_USERNAME = "username"
KIND_PUBLISH_ROOM = "publish_room"

ANTISPAM_CHECKS = Counter(
    "warden_antispam_checks_total",
    "Homeserver spam checks answered by this worker, by kind (event, username) and "
    "outcome (allowed, refused, unavailable: a filter's dependency failed, error: a bad "
    "request or unknown community).",
    ["kind", "outcome"],
)
ANTISPAM_CHECK_SECONDS = Histogram(
    "warden_antispam_check_seconds",
    "Time a worker took to judge one homeserver spam check.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Checks judged at once per worker; NATS buffers the rest (and the gateway times out).
MAX_IN_FLIGHT = 64
# Names of the filters that judge a user ID alone.
USER_ID_FILTERS = frozenset({"user_id_contains_words", "user_id_length"})


def username_filters() -> tuple[type[Filter], ...]:
    """The filters a user name goes through: the user-ID and text-capable ones."""
    from warden.filters.registry import FILTERS

    return tuple(f for f in FILTERS if f.checks_text or f.name in USER_ID_FILTERS)


def event_filters() -> tuple[type[Filter], ...]:
    """Every registered filter but the hellban postfilter, in pipeline order.

    An action refused here (an invite of a banned user, say) must not hellban whoever
    attempted it: the inviter did nothing wrong. A user hellbanned for what they sent
    is still refused (the prefilter runs).
    """
    from warden.filters.registry import FILTERS

    return tuple(f for f in FILTERS if f.name != "hellban_postfilter")


class AntispamCheckService(QueueResponder):
    """Answers homeserver spam checks, in the workers' queue group."""

    what = "antispam checks"

    def __init__(
        self, *, deps: FilterDeps, configs: CommunityConfigCache, timeout_seconds: float
    ) -> None:
        self._configs = configs
        self._pool = deps.pool
        events = Pipeline(deps, timeout_seconds=timeout_seconds, filters=event_filters())
        self._pipelines = {
            KIND_EVENT: events,
            KIND_USERNAME: Pipeline(
                deps, timeout_seconds=timeout_seconds, filters=username_filters()
            ),
            KIND_PUBLISH_ROOM: events,
        }
        self._text = Pipeline(deps, timeout_seconds=timeout_seconds, filters=text_filters())
        super().__init__(MAX_IN_FLIGHT)

    async def start(self, nc: NATS, subject: str = ANTISPAM_CHECK_SUBJECT) -> None:
        """Join the workers' queue group on ``subject`` (tests use one of their own)."""
        await self.subscribe(nc, subject)

    async def _answer(self, msg: Msg) -> None:
        start = time.perf_counter()
        kind = (msg.headers or {}).get(HEADER_ANTISPAM_KIND, "")
        outcome, reply = await self._judge(msg, kind)
        ANTISPAM_CHECKS.labels(kind if kind in self._pipelines else "unknown", outcome).inc()
        ANTISPAM_CHECK_SECONDS.observe(time.perf_counter() - start)
        if msg.reply:
            try:
                await msg.respond(reply)
            except Exception as exc:  # the gateway gave up or NATS closed: nobody waits
                logger.warning("antispam check reply failed", extra={"error": str(exc)})

    async def _judge(self, msg: Msg, kind: str) -> tuple[str, bytes]:
        headers = msg.headers or {}
        community_id = headers.get(HEADER_COMMUNITY, "")
        event_id = headers.get(HEADER_EVENT_ID, "")
        pipeline = self._pipelines.get(kind)
        if not community_id or not event_id or pipeline is None:
            return "error", orjson.dumps({"error": "missing or bad headers"})
        try:
            event = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            return "error", orjson.dumps({"error": "the body must be an event object"})
        try:
            config = await self._configs.get(community_id)
            verdict = await pipeline.evaluate(
                event,
                event_id=event_id,
                community_id=community_id,
                config=config,
                extra={"source": "antispam"},
            )
            if kind == KIND_PUBLISH_ROOM and verdict.content_class is not ContentClass.PROHIBITED:
                verdict = (
                    await self._judge_room_text(event, event_id, community_id, config) or verdict
                )
        except UnknownCommunity:
            return "error", orjson.dumps({"error": "unknown community"})
        except EvaluationUnavailable as exc:
            return "unavailable", orjson.dumps({"error": str(exc)})
        except Exception as exc:  # PostgreSQL down while loading the config, say
            logger.warning("antispam check failed", extra={"error": repr(exc)})
            return "unavailable", orjson.dumps({"error": "antispam check failed"})
        if verdict.content_class is not ContentClass.PROHIBITED:
            return "allowed", orjson.dumps({"harms": []})
        return "refused", orjson.dumps({"harms": list(verdict.harms)})

    async def _judge_room_text(
        self, event: dict[str, Any], event_id: str, community_id: str, config: EffectiveConfig
    ) -> Verdict | None:
        """The room's learned name and topic through the text-capable filters; None when
        Warden knows neither."""
        room_id = event.get("room_id")
        name, topic = (
            await room_state.get_name_and_topic(self._pool, room_id)
            if isinstance(room_id, str) and room_id
            else ("", "")
        )
        body = "\n".join(part for part in (name, topic) if part)
        if not body:
            return None
        text_event = {
            "type": "m.room.message",
            "sender": event.get("sender"),
            "room_id": room_id,
            "origin_server_ts": event.get("origin_server_ts"),
            "content": {"msgtype": "m.text", "body": body},
        }
        return await self._text.evaluate(
            text_event,
            event_id=f"{event_id}-name-topic",
            community_id=community_id,
            config=config,
            extra={"source": "antispam"},
        )

"""Moderation requests: an already refused event asked about by a server that is not
its sender's.

The moderator redacts a refused event only when the server that first asked about it is
not the sender's own (that server was told to refuse its user's event, so it never sent
it anywhere). A spammer's server that asks first would otherwise pin that decision: the
event it then sends elsewhere, refused from the gateway's cache to every other asker,
would never be redacted. So the first time this process answers a refusal first asked
for by the sender's server to another server, it publishes a moderation request
(``MODERATION_REQUEST_SUBJECT``, ``Nats-Msg-Id`` = ``<event ID>/moderate``: JetStream
keeps one per event across gateway replicas, and the moderator records what it did).

The cache hit path stays cheap: a dictionary lookup decides; the publish runs in the
background. Bounded: the event IDs already requested (oldest forgotten first: a
forgotten one costs one more deduplicated publish) and the publishes in flight (past it
the request is dropped and counted; the next such ask tries again).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import orjson
from nats.js import JetStreamContext

from warden.bus.subjects import MODERATION_REQUEST_SUBJECT
from warden_gateway.metrics import MODERATION_REQUESTS

logger = logging.getLogger(__name__)

DEFAULT_REMEMBERED = 10_000
DEFAULT_MAX_PENDING = 64
PUBLISH_TIMEOUT_SECONDS = 5.0

_PUBLISHED = MODERATION_REQUESTS.labels("published")
_FAILED = MODERATION_REQUESTS.labels("failed")
_DROPPED = MODERATION_REQUESTS.labels("dropped")


def request_message(event_id: str, origin: str) -> tuple[bytes, dict[str, str]]:
    """A moderation request's body and headers."""
    body = orjson.dumps({"event_id": event_id, "origin": origin})
    return body, {"Nats-Msg-Id": f"{event_id}/moderate"}


class ModerationRequests:
    """Publishes one moderation request per refused event this process sees re-asked."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        subject: str = MODERATION_REQUEST_SUBJECT,
        remembered: int = DEFAULT_REMEMBERED,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self._js = js
        self._subject = subject
        self._remembered = remembered
        self._max_pending = max_pending
        self._done: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[str, asyncio.Task[None]] = {}

    @property
    def requested(self) -> int:
        """Moderation requests published and remembered, or in flight."""
        return len(self._done) + len(self._pending)

    def request(self, event_id: str, origin: str) -> None:
        """Ask the moderator to act on ``event_id``, which ``origin`` asked about (once)."""
        if event_id in self._done or event_id in self._pending:
            return
        if len(self._pending) >= self._max_pending:
            _DROPPED.inc()
            return
        task = asyncio.create_task(self._publish(event_id, origin), name="moderation-request")
        self._pending[event_id] = task
        task.add_done_callback(lambda _: self._pending.pop(event_id, None))

    async def _publish(self, event_id: str, origin: str) -> None:
        body, headers = request_message(event_id, origin)
        try:
            await self._js.publish(
                self._subject, body, headers=headers, timeout=PUBLISH_TIMEOUT_SECONDS
            )
        except Exception as exc:  # NATS down or the stream full: the next ask tries again
            _FAILED.inc()
            logger.warning(
                "could not publish a moderation request",
                extra={"event_id": event_id, "error": f"{type(exc).__name__}: {exc}"},
            )
            return
        _PUBLISHED.inc()
        logger.info(
            "refused event asked about by another server; moderation requested",
            extra={"event_id": event_id, "origin": origin},
        )
        self._done[event_id] = None
        while len(self._done) > self._remembered:
            self._done.popitem(last=False)

    async def aclose(self) -> None:
        """Let publishes in flight finish (the runtime bounds the wait)."""
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)

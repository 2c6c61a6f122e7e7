"""Deciding, for one prohibited verdict, whether and how to redact the event.

Redact when the event may have reached other servers and the room has a moderator
whose access token is configured:

- skip when the server that asked about the event is the sender's own server: that
  server was told to refuse its user's event, so it never sent it anywhere (policyserv
  applies the same rule);
- skip when the room has no moderator, or no configured token belongs to them;
- skip when the verdict says the sender was not verified (a third-party invite nobody
  proved the named sender made): the room's auth rules reject such a forgery anyway,
  and a redaction would be an action against the named user.

A moderation request (``MODERATION_REQUEST_SUBJECT``: a refusal first asked for by its
sender's own server, since asked about by another server) is handled as the stored
verdict with the asking server as origin, so it is redacted by the same rules, once:
the transaction ID is derived from the event ID and ``moderation_actions`` records what
was done.

Each outcome is logged as one JSON line (event and room IDs, never content), counted
in ``warden_moderation_actions_total`` and, once a redaction was attempted, recorded
in ``moderation_actions``. The message is acknowledged only after the redaction
succeeded or was given up on; temporary failures are redelivered with backoff.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import asyncpg
import orjson

from warden.bus.consumer import ACK, Delivery, Disposition, Retry, backoff_delay
from warden.bus.subjects import MODERATION_REQUEST_SUBJECT
from warden.matrix.ids import server_name_of
from warden.outbound_http import Result
from warden.policy.verdict import Verdict
from warden.storage import deliveries, rooms
from warden.storage.verdicts import get_verdict
from warden_moderator.client_api import REDACTION_REASON, ClientAPI
from warden_moderator.metrics import MODERATION_ACTIONS, MODERATION_SECONDS

logger = logging.getLogger(__name__)

ACTION = "redact"


class Redactor:
    """The moderator's message handler."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client_api: ClientAPI,
        *,
        max_attempts: int,
        retry_base_seconds: float,
        moderation_subject: str = MODERATION_REQUEST_SUBJECT,
    ) -> None:
        self._pool = pool
        self._moderation_subject = moderation_subject
        self._api = client_api
        self._max_attempts = max_attempts
        self._retry_base = retry_base_seconds

    async def __call__(self, delivery: Delivery) -> Disposition:
        """Handle one verdict message; return whether to acknowledge it."""
        started = time.perf_counter()
        try:
            return await self._handle(delivery)
        finally:
            MODERATION_SECONDS.labels(ACTION).observe(time.perf_counter() - started)

    def _done(self, outcome: str, *, level: int = logging.INFO, **fields: Any) -> None:
        MODERATION_ACTIONS.labels(ACTION, outcome).inc()
        logger.log(
            level,
            "moderation action",
            extra={"event": "moderation_action", "action": ACTION, "outcome": outcome, **fields},
        )

    async def _handle(self, delivery: Delivery) -> Disposition:
        try:
            if delivery.subject == self._moderation_subject:
                found = await self._requested_verdict(delivery.data)
                if found is None:
                    self._done("unknown_event", stream_sequence=delivery.stream_sequence)
                    return ACK
                verdict = found
            else:
                verdict = Verdict.from_json(delivery.data)
        except (ValueError, KeyError, TypeError) as exc:
            # Redelivering a message that cannot be parsed would not help.
            self._done(
                "invalid",
                level=logging.ERROR,
                stream_sequence=delivery.stream_sequence,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )
            return ACK
        ids: dict[str, Any] = {
            "event_id": verdict.event_id,
            "room_id": verdict.room_id,
            "attempt": delivery.attempt,
        }
        if not verdict.prohibited:
            self._done("not_prohibited", **ids)
            return ACK
        if _sender_server(verdict.sender) == verdict.origin:
            self._done("skipped_own_server", **ids, origin=verdict.origin)
            return ACK
        if not verdict.sender_verified:
            self._done("skipped_unverified_sender", **ids)
            return ACK

        previous = await deliveries.get_moderation_action(self._pool, verdict.event_id)
        if previous is not None and previous.final:
            self._done("already_done", **ids, status=previous.status)
            return ACK

        room = await rooms.get_room(self._pool, verdict.room_id)
        if room is None or not room.moderator_user_id:
            self._done("no_moderator", **ids)
            return ACK
        moderator = room.moderator_user_id
        client = self._api.for_user(moderator)
        if client is None:
            if self._api.any_pending and delivery.attempt < self._max_attempts:
                # Some token's user is still unknown (its homeserver did not answer
                # whoami yet); it may be this moderator's.
                delay = backoff_delay(delivery.attempt, self._retry_base)
                self._done("retry", **ids, reason="moderator tokens not resolved yet")
                return Retry(delay, "moderator tokens not resolved")
            self._done(
                "moderator_not_configured", level=logging.WARNING, **ids, moderator=moderator
            )
            return ACK

        attempt = await self._api.redact(
            client, verdict.room_id, verdict.event_id, REDACTION_REASON
        )
        fields = {**ids, "moderator": moderator, "status": attempt.status}
        if attempt.result is Result.OK:
            await self._record(verdict, moderator, "done", delivery.attempt)
            self._done("ok", **fields)
            return ACK
        if attempt.result is Result.TEMPORARY and delivery.attempt < self._max_attempts:
            delay = backoff_delay(delivery.attempt, self._retry_base)
            if attempt.retry_after is not None:
                delay = max(delay, attempt.retry_after)
            await self._record(verdict, moderator, "pending", delivery.attempt, attempt.error)
            self._done(
                "retry", level=logging.WARNING, **fields, error=attempt.error, retry_in=delay
            )
            return Retry(delay, attempt.error)
        await self._record(verdict, moderator, "failed", delivery.attempt, attempt.error)
        self._done("failed", level=logging.ERROR, **fields, error=attempt.error)
        return ACK

    async def _requested_verdict(self, data: bytes) -> Verdict | None:
        """The stored verdict a moderation request names, with the asker as origin."""
        request = orjson.loads(data)
        if not isinstance(request, dict):
            raise ValueError("a moderation request must be a JSON object")
        event_id, origin = request["event_id"], request["origin"]
        if not isinstance(event_id, str) or not isinstance(origin, str):
            raise TypeError("event_id and origin must be strings")
        stored = await get_verdict(self._pool, event_id)
        return None if stored is None else dataclasses.replace(stored, origin=origin)

    async def _record(
        self,
        verdict: Verdict,
        moderator: str,
        status: deliveries.ModerationStatus,
        attempts: int,
        error: str = "",
    ) -> None:
        await deliveries.record_moderation_action(
            self._pool,
            event_id=verdict.event_id,
            room_id=verdict.room_id,
            action=ACTION,
            moderator_user_id=moderator,
            status=status,
            attempts=attempts,
            last_error=error,
        )


def _sender_server(sender: str) -> str | None:
    try:
        return server_name_of(sender)
    except ValueError:
        return None

"""Deciding, for one prohibited verdict, whether to send the community's audit webhook.

Order of checks: the message parses and is prohibited; no earlier delivery of this
event reached a final state (``webhook_deliveries``); the community has a
``webhook_url``; the URL is allowed; this message claims the event's row (below); at
connect time the URL's addresses are allowed. Then one POST is made per message
delivery:

- 2xx: recorded ``delivered``, acknowledged;
- temporary failure (network, timeout, 408/425/429/5xx): recorded ``pending`` and
  redelivered with backoff (at least the receiver's ``Retry-After``), up to
  ``PS_WEBHOOK_MAX_ATTEMPTS``, after which it is recorded ``failed``;
- anything else (4xx, 3xx: redirects are not followed): recorded ``failed``.

Delivery guarantee: the record is checked before each POST and written right after it,
and the message is acknowledged only after that, so a redelivery does not POST again
once the record says delivered or failed. What remains is the window between the
target's 2xx and our record (the process dying there): that event is POSTed again,
with the same ``Idempotency-Key: <event ID>``, so a receiver that honours the key sees
it exactly once. On the wire it is at least once.

One event can arrive in two messages (the verdict and its ``/send`` re-publication,
``Nats-Msg-Id <id>/send``). Before POSTing, the message claims the event's row in one
statement (``claim_webhook_delivery``); a second message that finds a live claim of
another message acknowledges without POSTing (outcome ``duplicate``), since the holder's
message carries the delivery through its own retries. The claim lasts one POST plus a
margin, and through the backoff of a pending retry; a lapsed claim (its holder died and
its message was given up) can be taken over.

One JSON log line per outcome, with the event ID and the URL's host (never the URL's
path, which often holds a secret, and never event content).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from warden.bus.consumer import ACK, Delivery, Disposition, Retry, backoff_delay
from warden.outbound_http import Result
from warden.policy.verdict import Verdict
from warden.storage import deliveries
from warden_webhooks.metrics import WEBHOOK_DELIVERIES, WEBHOOK_SECONDS
from warden_webhooks.report import build_report
from warden_webhooks.target import NotAllowed, WebhookSender, check_webhook_url
from warden_webhooks.webhook_urls import WebhookURLs

logger = logging.getLogger(__name__)


class Notifier:
    """The webhooks service's message handler."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        urls: WebhookURLs,
        sender: WebhookSender,
        *,
        allowed_domains: Sequence[str],
        max_attempts: int,
        retry_base_seconds: float,
        claim_seconds: float = 90.0,
    ) -> None:
        self._pool = pool
        self._urls = urls
        self._sender = sender
        self._allowed = list(allowed_domains)
        self._max_attempts = max_attempts
        self._retry_base = retry_base_seconds
        # Longer than one POST can take (the sender's total timeout), so a live holder
        # is never overtaken mid-POST.
        self._claim_ms = int(claim_seconds * 1000)

    async def __call__(self, delivery: Delivery) -> Disposition:
        """Handle one verdict message; return whether to acknowledge it."""
        started = time.perf_counter()
        try:
            return await self._handle(delivery)
        finally:
            WEBHOOK_SECONDS.observe(time.perf_counter() - started)

    def _done(self, outcome: str, *, level: int = logging.INFO, **fields: Any) -> None:
        WEBHOOK_DELIVERIES.labels(outcome).inc()
        logger.log(
            level,
            "webhook",
            extra={"event": "webhook_action", "outcome": outcome, **fields},
        )

    async def _handle(self, delivery: Delivery) -> Disposition:
        try:
            verdict = Verdict.from_json(delivery.data)
        except (ValueError, KeyError, TypeError) as exc:
            self._done(
                "invalid",
                level=logging.ERROR,
                stream_sequence=delivery.stream_sequence,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )
            return ACK
        ids: dict[str, Any] = {
            "event_id": verdict.event_id,
            "community_id": verdict.community_id,
            "attempt": delivery.attempt,
        }
        if not verdict.prohibited:
            self._done("not_prohibited", **ids)
            return ACK

        previous = await deliveries.get_webhook_delivery(self._pool, verdict.event_id)
        if previous is not None and previous.final:
            self._done("already_done", **ids, status=previous.status)
            return ACK

        url = await self._urls.get(verdict.community_id)
        if not url:
            self._done("skipped_no_url", **ids)
            return ACK
        try:
            target = check_webhook_url(url, self._allowed)
        except NotAllowed as exc:
            self._done("skipped_not_allowed", level=logging.WARNING, **ids, reason=str(exc))
            return ACK
        ids["url_host"] = target.host

        claimed = await deliveries.claim_webhook_delivery(
            self._pool,
            event_id=verdict.event_id,
            community_id=verdict.community_id,
            url_host=target.host,
            stream_sequence=delivery.stream_sequence,
            attempt=delivery.attempt,
            lease_ms=self._claim_ms,
        )
        if not claimed:
            # Another message for this event holds it, or it just became final.
            self._done("duplicate", **ids)
            return ACK

        payload = build_report(verdict, now_ms=int(time.time() * 1000))
        try:
            attempt = await self._sender.post(target, payload, idempotency_key=verdict.event_id)
        except NotAllowed as exc:
            await deliveries.release_webhook_claim(
                self._pool, verdict.event_id, delivery.stream_sequence
            )
            self._done("skipped_not_allowed", level=logging.WARNING, **ids, reason=str(exc))
            return ACK

        fields = {**ids, "status": attempt.status}
        if attempt.result is Result.OK:
            await self._record(verdict, target.host, "delivered", delivery.attempt)
            self._done("delivered", **fields)
            return ACK
        if attempt.result is Result.TEMPORARY and delivery.attempt < self._max_attempts:
            delay = backoff_delay(delivery.attempt, self._retry_base)
            if attempt.retry_after is not None:
                delay = max(delay, attempt.retry_after)
            # Keep the claim through the backoff: the retry belongs to this message.
            hold_until = int((time.time() + delay) * 1000) + self._claim_ms
            await self._record(
                verdict,
                target.host,
                "pending",
                delivery.attempt,
                attempt.error,
                claim=(delivery.stream_sequence, hold_until),
            )
            self._done(
                "retry", level=logging.WARNING, **fields, error=attempt.error, retry_in=delay
            )
            return Retry(delay, attempt.error)
        await self._record(verdict, target.host, "failed", delivery.attempt, attempt.error)
        self._done("failed", level=logging.ERROR, **fields, error=attempt.error)
        return ACK

    async def _record(
        self,
        verdict: Verdict,
        host: str,
        status: deliveries.WebhookStatus,
        attempts: int,
        error: str = "",
        *,
        claim: tuple[int, int] | None = None,
    ) -> None:
        await deliveries.record_webhook_delivery(
            self._pool,
            event_id=verdict.event_id,
            community_id=verdict.community_id,
            url_host=host,
            status=status,
            attempts=attempts,
            last_error=error,
            claim_seq=claim[0] if claim else None,
            claimed_until=claim[1] if claim else 0,
        )

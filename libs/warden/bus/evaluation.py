"""The evaluation request and reply on ``EVALUATE_SUBJECT``, encoded and decoded in one
place for both sides (the gateway asks, a filter worker answers).

Request: the PDU as the gateway received it (JSON bytes) with the ``HEADER_*`` headers of
``warden.bus.subjects`` (plus W3C trace context, added by the caller). Reply: a verdict
(``Verdict.to_json``) or ``{"error": "..."}`` when the worker could not judge, with
``"retry_after_ms"`` when it could not because a dependency failed (nothing was stored:
asking again later judges the event afresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from warden.bus.subjects import (
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_REFERENCE_HASH,
    HEADER_ROOM_VERSION,
    HEADER_SENDER_UNSIGNED,
    HEADER_SOURCE,
)
from warden.policy.verdict import Verdict


class BadRequest(ValueError):
    """An evaluation request that cannot be judged as sent."""


class WorkerError(RuntimeError):
    """The worker answered that it could not judge the event.

    ``retry_after_ms`` is set when the cause was a failing dependency (PostgreSQL,
    Redis, a classifier): a transient condition, not a verdict.
    """

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class EvaluationRequest:
    """What the gateway knows about an event when it asks for its verdict."""

    event_id: str
    community_id: str
    reference_hash: str = ""  # unpadded base64 sha256 of the redacted event
    room_version: str = ""
    origin: str = ""  # the server that asked the gateway (X-Matrix origin)
    source: str = ""  # "sign", "check" or "send"
    pdu: bytes = b""  # the PDU as received
    # Whether the gateway verified a signature by the sender's server (every event but
    # a third-party invite needs one to pass its checks at all).
    sender_signed: bool = True
    # The parsed PDU, filled in by ``decode_request`` on the worker's side.
    event: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def headers(self) -> dict[str, str]:
        """The request's NATS headers (trace context not included)."""
        headers = {
            HEADER_ROOM_VERSION: self.room_version,
            HEADER_COMMUNITY: self.community_id,
            HEADER_ORIGIN: self.origin,
            HEADER_EVENT_ID: self.event_id,
            HEADER_SOURCE: self.source,
            HEADER_REFERENCE_HASH: self.reference_hash,
        }
        if not self.sender_signed:
            headers[HEADER_SENDER_UNSIGNED] = "1"
        return headers


def decode_request(data: bytes, headers: Mapping[str, str] | None) -> EvaluationRequest:
    """Parse a request's body (the PDU) and headers; raises ``BadRequest``."""
    h = headers or {}
    event_id = h.get(HEADER_EVENT_ID, "")
    community_id = h.get(HEADER_COMMUNITY, "")
    if not event_id:
        raise BadRequest(f"missing header {HEADER_EVENT_ID}")
    if not community_id:
        raise BadRequest(f"missing header {HEADER_COMMUNITY}")
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise BadRequest("body must be a JSON object (the PDU)")
    return EvaluationRequest(
        event_id=event_id,
        community_id=community_id,
        reference_hash=h.get(HEADER_REFERENCE_HASH, ""),
        room_version=h.get(HEADER_ROOM_VERSION, ""),
        origin=h.get(HEADER_ORIGIN, ""),
        source=h.get(HEADER_SOURCE, ""),
        pdu=data,
        sender_signed=h.get(HEADER_SENDER_UNSIGNED) != "1",
        event=event,
    )


def encode_error_reply(message: str, *, retry_after_ms: int | None = None) -> bytes:
    """The reply when no verdict can be given (``retry_after_ms``: a dependency failed)."""
    if retry_after_ms is None:
        return orjson.dumps({"error": message})
    return orjson.dumps({"error": message, "retry_after_ms": retry_after_ms})


def decode_reply(data: bytes, *, with_filters: bool = True) -> Verdict:
    """A worker's reply as a verdict (without its filter outcomes if ``with_filters`` is
    false: the gateway only needs the decision, and decoding them cost it CPU).

    Raises ``WorkerError`` for an error reply and ``ValueError`` for anything unreadable.
    """
    try:
        body: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ValueError("reply is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("reply is not a JSON object")
    if "error" in body and "class" not in body:
        retry = body.get("retry_after_ms")
        raise WorkerError(
            str(body["error"])[:500],
            retry if isinstance(retry, int) and not isinstance(retry, bool) else None,
        )
    if not with_filters:
        body["filters"] = []
    try:
        return Verdict.from_dict(body)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"reply is not a verdict: {exc}") from None

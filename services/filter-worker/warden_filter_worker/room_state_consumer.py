"""The room-state consumer: what every filter worker does with PDUs received over ``/send``.

The gateway publishes each PDU of a protected room to ``INBOUND_PDU_SUBJECT``; every
filter worker reads the stream through the shared durable consumer
``ROOM_STATE_CONSUMER`` and, for each PDU, acknowledging only when done:

1. checks that the transaction's origin is in the room: learned membership has a
   joined member on that server. A PDU from any other origin is neither learned nor
   judged (counted ``origin_not_in_room``): nothing shows the event is in the room,
   and a verdict would be final for its event ID and could cause a redaction, a
   webhook or a hellban. Membership learned from the same transaction may not have
   been applied yet (workers share the stream), so such a PDU is retried a few times
   (``NOT_IN_ROOM_ATTEMPTS``) before it is dropped;
2. checks the signatures of every server required to sign it (the sender's, ...), with
   the same keyring as the gateway. An event that fails is dropped (acknowledged,
   counted ``bad_signature``): it never reaches the learned state or the filters;
3. checks the auth rules as far as learned state can (``warden.matrix.state_auth``):
   the sender is a joined member with the power level the event type needs,
   membership changes follow the membership rules (a kick or ban of Warden's user
   counts only when its sender had the power), member state keys are user IDs. An
   event that fails is retried like in 1, then neither learned nor judged (counted
   ``unauthorised``);
4. learns from it (``warden.storage.room_state.apply_event``, within the per-room
   caps): members and display names, power levels, join rules, the create event's
   creators, the server ACL, ``m.room.policy``, policy list rules; and the room's
   latest event, the anchor of the periodic refresh. When Warden's own user is kicked
   or banned, that is recorded and logged as an error (policyserv says nothing), and
   gateways are told (``CONFIG_CHANGED_SUBJECT``): ``/sign`` for the room answers 404
   like for an unknown room, and the refresh skips it until Warden joins again.
   State is learned whatever the verdict (a refused event can still be part of the
   room's state: only auth rules decide);
5. when the event lacks a valid ``ed25519:policy_server`` signature by Warden, it
   bypassed the policy server: it is judged through the very path ``/sign`` uses (an
   evaluation request on ``EVALUATE_SUBJECT``, ``source`` ``send``), so the verdict
   store keeps one verdict per event forever and never gives a second opinion. Not
   judged: ``m.room.policy`` with an empty state key (always signed), membership
   events (homeservers never ask about their local ones, so unsigned is normal), and
   events of our own server.

The ``origin`` of such an evaluation is our own server name, not the transaction's
origin: the moderator skips a verdict whose origin is the sender's own server (that
server was told to refuse, so the event never left it), but an event that reached us
over ``/send`` unsigned is in the room, whoever relayed it, and must be redacted. For
the same reason, when the stored verdict is a refusal first given to the sender's own
server (which then sent the event anyway), a copy with our server as origin is
published on the verdicts stream (``Nats-Msg-Id`` ``<event ID>/send``) so the moderator
redacts it.

A verdict that cannot be had (no worker answered, timeout) is retried with backoff:
the message is negatively acknowledged, and the state work repeats harmlessly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import Counter
from unpaddedbase64 import encode_base64

from warden.bus.consumer import ACK, Delivery, Disposition, Retry, backoff_delay
from warden.bus.evaluation import EvaluationRequest, decode_reply
from warden.bus.subjects import (
    CONFIG_CHANGED_SUBJECT,
    EVALUATE_SUBJECT,
    HEADER_ORIGIN,
    HEADER_ROOM_ID,
    verdict_subject,
)
from warden.federation.snapshot import verify_signatures
from warden.federation.xmatrix import VerifyKeySource
from warden.matrix.event_hashes import (
    event_id_from_reference_hash,
    redacted_signing_bytes,
)
from warden.matrix.event_signing import (
    EventSignatureError,
    servers_required_to_sign,
    verify_event_signature,
)
from warden.matrix.keys import POLICY_SERVER_KEY_ID, VerifyKey
from warden.matrix.room_versions import RoomVersion, get_room_version
from warden.matrix.state_auth import check_event
from warden.policy.verdict import Verdict
from warden.storage.room_state import (
    DEFAULT_CAPS,
    MEMBER,
    StateCaps,
    apply_event,
    load_auth_state,
    server_in_room,
)
from warden.storage.rooms import get_room
from warden.telemetry.tracing import inject_headers, tracer

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

RETRY_BASE_SECONDS = 1.0
UNKNOWN_ROOM_ATTEMPTS = 5
# A PDU whose origin is not (yet) in the room, or that fails the auth rules against
# learned state, is tried this many times (the membership or power level it needs may
# be in the same transaction, handled by another worker), then dropped.
NOT_IN_ROOM_ATTEMPTS = 3
NOT_IN_ROOM_RETRY_SECONDS = 2.0

ROOM_STATE_PDUS = Counter(
    "warden_room_state_pdus_total",
    "Inbound PDUs handled by the room-state consumer, by outcome (ok, bad_signature, "
    "invalid, unknown_room, origin_not_in_room, unauthorised, judged, redaction_requested, "
    "verdict_unavailable).",
    ["outcome"],
)
ROOM_STATE_UPDATES = Counter(
    "warden_room_state_updates_total",
    "Changes to learned room state, by kind (member, power_levels, create, server_acl, "
    "policy, policy_rule, own_membership_lost, refresh).",
    ["kind"],
)


def _sender_server(pdu: Mapping[str, Any]) -> str:
    sender = pdu.get("sender")
    if not isinstance(sender, str):
        return ""
    _, _, server = sender.partition(":")
    return server


class RoomStateConsumer:
    """Handles inbound PDUs (``handle`` is the ``PullConsumer`` handler)."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        nc: NATS,
        js: JetStreamContext,
        keyring: VerifyKeySource,
        server_name: str,
        policy_verify_key: VerifyKey,
        local_user_id: str,
        verdict_timeout_seconds: float,
        evaluate_subject: str = EVALUATE_SUBJECT,
        caps: StateCaps = DEFAULT_CAPS,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._js = js
        self._keyring = keyring
        self._server_name = server_name
        self._policy_key = policy_verify_key
        self._local_user_id = local_user_id
        self._timeout = verdict_timeout_seconds
        self._subject = evaluate_subject
        self._caps = caps

    async def handle(self, delivery: Delivery) -> Disposition:
        """Process one inbound PDU."""
        with _tracer.start_as_current_span("room_state.pdu"):
            outcome, disposition = await self._process(delivery)
        ROOM_STATE_PDUS.labels(outcome).inc()
        return disposition

    async def _process(self, delivery: Delivery) -> tuple[str, Disposition]:
        headers = delivery.headers
        room_id = headers.get(HEADER_ROOM_ID, "")
        try:
            pdu = orjson.loads(delivery.data)
        except orjson.JSONDecodeError:
            return "invalid", ACK
        if not isinstance(pdu, dict) or not room_id:
            return "invalid", ACK
        room = await get_room(self._pool, room_id)
        if room is None:
            # Unprotected since the gateway took it, or (when several deployments share
            # a NATS server by mistake, or test sessions do) a room of another
            # database: give other workers a few chances before dropping it.
            if delivery.attempt < UNKNOWN_ROOM_ATTEMPTS:
                return "unknown_room", Retry(1.0, "unknown room")
            return "unknown_room", ACK
        room_version = get_room_version(room.room_version)
        try:
            signing_bytes = redacted_signing_bytes(room_version, pdu)
        except ValueError:
            return "invalid", ACK
        reference_hash = hashlib.sha256(signing_bytes).digest()
        if room_version.event_id_in_json:
            event_id = pdu.get("event_id")
            if not isinstance(event_id, str):
                return "invalid", ACK
        else:
            event_id = event_id_from_reference_hash(room_version, reference_hash)

        origin = headers.get(HEADER_ORIGIN, "")
        if not await server_in_room(self._pool, room_id, origin):
            if delivery.attempt < NOT_IN_ROOM_ATTEMPTS:
                return "origin_not_in_room", Retry(NOT_IN_ROOM_RETRY_SECONDS, "origin not in room")
            logger.info(
                "inbound event dropped: its origin is not in the room",
                extra={"event_id": event_id, "room_id": room_id, "origin": origin},
            )
            return "origin_not_in_room", ACK

        try:
            await verify_signatures(self._keyring, room_version, pdu)
        except EventSignatureError as exc:
            logger.warning(
                "inbound event dropped: bad signature",
                extra={
                    "event_id": event_id,
                    "room_id": room_id,
                    "origin": origin,
                    "error": str(exc),
                },
            )
            return "bad_signature", ACK

        refusal = check_event(pdu, await load_auth_state(self._pool, room_id, room_version, pdu))
        if refusal is not None:
            if delivery.attempt < NOT_IN_ROOM_ATTEMPTS:
                return "unauthorised", Retry(NOT_IN_ROOM_RETRY_SECONDS, refusal)
            logger.info(
                "inbound event dropped: not allowed by the room's learned state",
                extra={
                    "event_id": event_id,
                    "room_id": room_id,
                    "origin": origin,
                    "error": refusal,
                },
            )
            return "unauthorised", ACK

        update = await apply_event(
            self._pool,
            room_id,
            pdu,
            event_id,
            our_user_id=self._local_user_id,
            caps=self._caps,
        )
        if update is not None and update.changed:
            ROOM_STATE_UPDATES.labels(update.kind).inc()
            if update.own_membership in ("leave", "ban") and pdu.get("sender") != (
                self._local_user_id
            ):
                ROOM_STATE_UPDATES.labels("own_membership_lost").inc()
                logger.error(
                    "Warden was removed from a protected room; it no longer receives "
                    "its events or /sign requests until it joins again",
                    extra={
                        "event": "own_membership_lost",
                        "room_id": room_id,
                        "membership": update.own_membership,
                        "by": pdu.get("sender"),
                        "event_id": event_id,
                    },
                )
                await self._announce_room_change(room_id)
        elif update is not None:
            ROOM_STATE_UPDATES.labels(update.kind).inc()

        if not self._needs_judgement(room_version, pdu):
            return "ok", ACK
        request = EvaluationRequest(
            event_id=event_id,
            community_id=room.community_id,
            reference_hash=encode_base64(reference_hash),
            room_version=room_version.identifier,
            origin=self._server_name,
            source="send",
            pdu=delivery.data,
            # Checked above when required; a third-party invite may lack it (H2).
            sender_signed=_sender_server(pdu) in servers_required_to_sign(room_version, pdu),
        )
        try:
            verdict = await self._verdict(request)
        except Exception as exc:  # timeout, no responders, a worker's error reply, NATS
            logger.warning(
                "no verdict for an inbound event yet; will retry",
                extra={"event_id": event_id, "error": f"{type(exc).__name__}: {exc}"},
            )
            return "verdict_unavailable", Retry(
                backoff_delay(delivery.attempt, RETRY_BASE_SECONDS), "no verdict"
            )
        if verdict.prohibited and verdict.origin != self._server_name:
            sender_server = _sender_server(pdu)
            if verdict.origin == sender_server:
                await self._request_redaction(verdict)
                return "redaction_requested", ACK
        return "judged", ACK

    def _needs_judgement(self, room_version: RoomVersion, pdu: Mapping[str, Any]) -> bool:
        if pdu.get("type") == "m.room.policy" and pdu.get("state_key") == "":
            return False  # always signed: a room must be able to change its policy server
        if _sender_server(pdu) == self._server_name:
            return False  # our own events (our joins and leaves)
        if pdu.get("type") == MEMBER:
            # Homeservers never ask a policy server about their local membership changes
            # (joins, leaves, invites, kicks, bans: see synapse-as-client.md), so an
            # unsigned one did not bypass Warden. Judging it would refuse a kick of
            # Warden's user, redact the kick and hellban the room admin who made it.
            return False
        return not verify_event_signature(
            room_version, pdu, self._server_name, POLICY_SERVER_KEY_ID, self._policy_key
        )

    async def _announce_room_change(self, room_id: str) -> None:
        """Tell gateways to drop their cached record of the room (``/sign`` now answers
        404 for it); the cache's TTL bounds the staleness when this fails."""
        try:
            await self._nc.publish(CONFIG_CHANGED_SUBJECT, orjson.dumps({"room_id": room_id}))
        except Exception as exc:  # NATS trouble: the room cache expires by itself
            logger.warning("could not announce a room change", extra={"error": repr(exc)})

    async def _verdict(self, request: EvaluationRequest) -> Verdict:
        msg = await self._nc.request(
            self._subject,
            request.pdu,
            timeout=self._timeout,
            headers=inject_headers(request.headers()),
        )
        return decode_reply(msg.data)

    async def _request_redaction(self, verdict: Verdict) -> None:
        """Publish the refusal again with our server as origin (see the module doc)."""
        copy = dataclasses.replace(
            verdict,
            origin=self._server_name,
            extra={**verdict.extra, "source": "send"},
        )
        await self._js.publish(
            verdict_subject(copy.content_class.label),
            copy.to_json(),
            headers=inject_headers({"Nats-Msg-Id": f"{verdict.event_id}/send"}),
            timeout=5.0,
        )
        logger.info(
            "refused event arrived over federation; asked the moderator to redact it",
            extra={"event_id": verdict.event_id, "room_id": verdict.room_id},
        )

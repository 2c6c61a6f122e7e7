"""The policy API: ``/sign`` (stable and unstable) and the legacy ``/check``.

Plain Starlette handlers with orjson: this is the hot path. Checks run cheapest first,
and nothing a client sends can produce a 5xx (only 503 when a dependency or the filter
workers cannot answer):

1. body size, while reading (413 ``M_TOO_LARGE``);
2. JSON (400 ``M_NOT_JSON``), canonical JSON values (400 ``M_BAD_JSON``);
3. X-Matrix authentication (401 ``M_UNAUTHORIZED``), which needs the parsed body;
4. the per-origin rate limit, after authentication so that a spoofed origin cannot
   spend a real origin's budget (429 ``M_LIMIT_EXCEEDED``). Questions about the
   origin's own users' events (the sender's server is the origin) spend its main
   budget; questions about other servers' events spend a second budget of the same
   size (``sign_others``), and cost nothing when the verdict is already in this
   replica's memory. In a spam wave every server in the room asks about each spam
   event: those answers come from cache and no longer exhaust the budget the
   servers' own users need (Synapse turns a 429 into a 500 for its user). A request
   whose body was not checked before is charged by its claimed sender before the
   event-level checks and refunded when it turns out to be a cached answer;
5. the room's record, cached in process (404 ``M_NOT_FOUND``); it gives the room
   version, which requests do not carry; checking it only after authentication keeps
   which rooms are protected from anonymous callers;
6. PDU structure for that version, then the content hash (400 ``M_BAD_JSON``);
7. reference hash and event ID, computed once from the redacted signing bytes (the
   same bytes our signature covers); on ``/check`` the path's event ID must match
   (400 ``M_INVALID_PARAM``);
8. the signatures of every server required to sign (400 ``M_BAD_JSON``); a third-party
   invite, which the sender's server need not sign, is judged without attributing
   anything to its sender unless that server signed it anyway or the room's
   ``m.room.third_party_invite`` vouches for it (the filter worker checks that);
9. ``m.room.policy`` with an empty state key is signed without a verdict: a room must
   always be able to replace or remove its policy server;
10. the verdict (``VerdictSource``); a verdict whose reference hash differs from the
    event's (a reused room v1/v2 event ID) is a refusal, never a signature. Filters
    see the event without ``unsigned`` and ``signatures`` (the worker drops them: no
    hash or signature covers them, so whoever asks first must not be able to change
    the verdict with them). A refusal
    first asked for by the sender's own server and now asked for by another server also
    asks the moderator to act (``ModerationRequests``, once per event).

Steps 2 and 6 to 8 depend only on the body's bytes and the room version: a body that
passed them is remembered by its digest (``event_checks``), and a repeat of it (every
server in the room asks for the same event) goes from step 1 to steps 3, 4, 5 and 10,
with the X-Matrix signature checked over the remembered canonical bytes.

Refusals: stable ``/sign`` answers 400 ``M_FORBIDDEN`` with the harm IDs in
``org.matrix.msc4387.harms``; unstable ``/sign`` answers 200 ``{}`` (MSC4284's unstable
form); ``/check`` answers ``{"recommendation": "spam"}``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from unpaddedbase64 import encode_base64

from warden.bus.evaluation import EvaluationRequest
from warden.federation.keyring_errors import KeyringError
from warden.federation.xmatrix import VerifyKeySource, verify_request_json
from warden.matrix.canonical_json import (
    CanonicalJSONError,
    parse_canonical,
    parse_canonical_encoded,
)
from warden.matrix.errors import (
    BadJSON,
    Forbidden,
    InvalidParam,
    LimitExceeded,
    MatrixError,
    NotFound,
    NotJSON,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from warden.matrix.event_hashes import (
    check_content_hash,
    event_id_from_reference_hash,
    redacted_signing_bytes,
    room_id_from_create_event,
)
from warden.matrix.event_signing import (
    EventSignatureError,
    EventVerifyKey,
    servers_required_to_sign,
    verify_sender_signature,
)
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.pdu import MAX_ID_LENGTH, validate_pdu
from warden.matrix.room_versions import RoomVersion, get_room_version
from warden.policy.harms import HARMS_FIELD
from warden.runtime.client_penalties import ClientPenalties
from warden.runtime.identity import Identity
from warden.storage.database import DATABASE_ERRORS
from warden.storage.records import Room
from warden.telemetry.tracing import entry_context, exporting, tracer
from warden_gateway.client_address import client_address
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.event_checks import CheckedEvent, CheckedEvents
from warden_gateway.json_response import JSONBytesResponse
from warden_gateway.metrics import SIGN_REQUESTS, SIGN_SECONDS, Endpoint, Outcome
from warden_gateway.moderation_requests import ModerationRequests
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.request_body import read_limited_body
from warden_gateway.verdict_source import VerdictSource

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

SIGN_PATH = "/_matrix/policy/v1/sign"
UNSTABLE_SIGN_PATH = "/_matrix/policy/unstable/org.matrix.msc4284/sign"
# Event IDs of room version 3 hold "/" (standard base64), hence the path converter.
CHECK_PATH = "/_matrix/policy/unstable/org.matrix.msc4284/event/{event_id:path}/check"

# Retry-After when PostgreSQL or Redis did not answer.
DEPENDENCY_RETRY_AFTER_SECONDS = 5

# A server has a handful of keys at most; more key IDs under one server in an event's
# signatures would only make us look up keys for nothing.
MAX_KEYS_PER_SIGNING_SERVER = 8

REFUSED_MESSAGE = "This event is not allowed by the room's policy server"
REUSED_ID_MESSAGE = (
    "This event ID was already judged for an event with different content; the policy "
    "server will not sign a second event under the same ID"
)

# The rate limit's budget for questions about other servers' events (see step 4).
OTHERS_BUCKET = "others"

# Failures of our own dependencies: 503, never 500, and never the client's fault.
_DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, RedisError)

_OUTCOMES: tuple[tuple[type[MatrixError], Outcome], ...] = (
    (TooLarge, Outcome.TOO_LARGE),
    (NotJSON, Outcome.NOT_JSON),
    (BadJSON, Outcome.BAD_JSON),
    (Unauthorized, Outcome.UNAUTHORIZED),
    (LimitExceeded, Outcome.RATE_LIMITED),
    (NotFound, Outcome.NOT_FOUND),
    (InvalidParam, Outcome.INVALID_PARAM),
    (Unavailable, Outcome.UNAVAILABLE),
)


# Answers that count towards a client address's authentication-failure penalty
# (``client_penalties``): failed X-Matrix, or a body unreadable before any of it.
_PENALISED_OUTCOMES = frozenset(
    {Outcome.UNAUTHORIZED, Outcome.NOT_JSON, Outcome.BAD_JSON, Outcome.TOO_LARGE}
)

# Metric children bound once: ``labels()`` costs a lock and a lookup per call.
_SIGN_REQUESTS = {(e, o): SIGN_REQUESTS.labels(e, o) for e in Endpoint for o in Outcome}
_SIGN_SECONDS = {e: SIGN_SECONDS.labels(e) for e in Endpoint}


class RoomLookup(Protocol):
    """What the policy API needs from a room cache (``RoomCache`` implements it)."""

    async def get(self, room_id: str) -> Room | None:
        """The room's record, or None when it is not protected."""
        ...


class Refused(Forbidden):
    """The policy server refuses to sign: 400 ``M_FORBIDDEN`` (the spec's status for a
    refusal; 403 is for ACL'd servers)."""

    status = 400


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy server's answer for one event: a signature or a refusal."""

    event_id: str
    signature: str | None = None
    refusal: str | None = None
    harms: tuple[str, ...] = ()


def _outcome_for(exc: MatrixError) -> Outcome:
    for cls, outcome in _OUTCOMES:
        if isinstance(exc, cls):
            return outcome
    return Outcome.OTHER_ERROR


def _request_target(request: Request) -> str:
    """The request target as received (path and query, percent-encoding untouched)."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _parse_body(body: bytes) -> tuple[dict[str, Any], bytes]:
    """The PDU, and its canonical JSON (what X-Matrix signed: usually the body itself)."""
    try:
        value, content_json = parse_canonical_encoded(body)
    except CanonicalJSONError as exc:
        raise BadJSON(f"Request body is not valid Matrix JSON: {exc}") from None
    except ValueError:
        raise NotJSON("Request body is not JSON") from None
    if not isinstance(value, dict):
        raise NotJSON("Request body must be a JSON object (the PDU)")
    return value, content_json


def _sender_server(pdu: dict[str, Any]) -> str:
    sender = pdu.get("sender")
    return sender.partition(":")[2] if isinstance(sender, str) else ""


def _is_policy_state_event(pdu: dict[str, Any]) -> bool:
    return pdu.get("type") == "m.room.policy" and pdu.get("state_key") == ""


def _json(body: object, status: int = 200) -> Response:
    return JSONBytesResponse(orjson.dumps(body), status)


class PolicyAPI:
    """The ``/sign`` and ``/check`` handlers and their dependencies."""

    def __init__(
        self,
        *,
        identity: Identity,
        keyring: VerifyKeySource,
        rooms: RoomLookup,
        verdicts: VerdictSource,
        rate_limiter: OriginRateLimiter | None,
        max_body_bytes: int,
        checked_events: CheckedEvents | None = None,
        moderation: ModerationRequests | None = None,
        penalties: ClientPenalties | None = None,
    ) -> None:
        self._identity = identity
        self._server_name = identity.server_name
        self._keyring = keyring
        self._rooms = rooms
        self._verdicts = verdicts
        self._rate_limiter = rate_limiter
        self._max_body_bytes = max_body_bytes
        self._checked = checked_events if checked_events is not None else CheckedEvents()
        self._moderation = moderation
        self._penalties = penalties

    def routes(self) -> list[Route]:
        """The policy API's routes."""
        return [
            Route(SIGN_PATH, self.sign, methods=["POST"]),
            Route(UNSTABLE_SIGN_PATH, self.sign_unstable, methods=["POST"]),
            Route(CHECK_PATH, self.check, methods=["POST"]),
        ]

    # --- handlers ---

    async def sign(self, request: Request) -> Response:
        """``POST /_matrix/policy/v1/sign``."""
        return await self._answer(request, Endpoint.SIGN, None)

    async def sign_unstable(self, request: Request) -> Response:
        """``POST /_matrix/policy/unstable/org.matrix.msc4284/sign``."""
        return await self._answer(request, Endpoint.SIGN_UNSTABLE, None)

    async def check(self, request: Request) -> Response:
        """``POST /_matrix/policy/unstable/org.matrix.msc4284/event/{eventId}/check``."""
        return await self._answer(request, Endpoint.CHECK, str(request.path_params["event_id"]))

    async def _answer(
        self, request: Request, endpoint: Endpoint, path_event_id: str | None
    ) -> Response:
        start = time.perf_counter()
        outcome = Outcome.OTHER_ERROR
        try:
            if exporting():
                trace_context, with_span = entry_context()
                if with_span:
                    with _tracer.start_as_current_span(
                        "policy." + endpoint.value,
                        context=trace_context,
                        kind=SpanKind.SERVER,
                        attributes={"warden.endpoint": endpoint.value},
                    ):
                        decision = await self._decide(request, endpoint, path_event_id)
                else:
                    # Not sampled: no span object, but the unsampled trace travels on
                    # so that the workers do not sample it on their own.
                    token = otel_context.attach(trace_context)
                    try:
                        decision = await self._decide(request, endpoint, path_event_id)
                    finally:
                        otel_context.detach(token)
            else:
                # No exporter: a span per request would cost CPU for nobody. A caller's
                # trace context (``TraceContextMiddleware``) still travels on.
                decision = await self._decide(request, endpoint, path_event_id)
            outcome = Outcome.SIGNED if decision.signature is not None else Outcome.REFUSED
            return self._render(endpoint, decision)
        except MatrixError as exc:
            outcome = _outcome_for(exc)
            if outcome in _PENALISED_OUTCOMES and self._penalties is not None:
                self._penalties.failed_request(request.scope)
            return error_response(exc)
        except _DEPENDENCY_ERRORS as exc:
            outcome = Outcome.UNAVAILABLE
            logger.warning(
                "policy request failed on a dependency",
                extra={"endpoint": endpoint.value, "error": f"{type(exc).__name__}: {exc}"},
            )
            return error_response(
                TemporarilyUnavailable(
                    "The policy server is temporarily unavailable; try again later",
                    retry_after_seconds=DEPENDENCY_RETRY_AFTER_SECONDS,
                )
            )
        finally:
            _SIGN_REQUESTS[endpoint, outcome].inc()
            _SIGN_SECONDS[endpoint].observe(time.perf_counter() - start)

    def _render(self, endpoint: Endpoint, decision: Decision) -> Response:
        if endpoint is Endpoint.CHECK:
            verdict = "ok" if decision.signature is not None else "spam"
            return _json({"recommendation": verdict})
        if decision.signature is not None:
            return _json({self._server_name: {POLICY_SERVER_KEY_ID: decision.signature}})
        if endpoint is Endpoint.SIGN_UNSTABLE:
            return _json({})
        assert decision.refusal is not None
        return error_response(Refused(decision.refusal, **{HARMS_FIELD: list(decision.harms)}))

    # --- the decision ---

    async def _decide(
        self, request: Request, endpoint: Endpoint, path_event_id: str | None
    ) -> Decision:
        body = await read_limited_body(request, self._max_body_bytes)
        digest = hashlib.sha256(body).digest()
        checked = self._checked.get(digest)
        if checked is not None:
            origin = await self._authenticate(request, checked.content_json)
            self._charge_checked(origin, checked)
            room = await self._rooms.get(checked.room_id)
            if room is None:
                raise NotFound("This room is not protected by this policy server")
            if room.room_version == checked.room_version:
                self._check_path_event_id(path_event_id, checked.event_id)
                return await self._judge(endpoint, checked, room, origin, body, None)
            # The room was protected again under another version: check from scratch
            # (already charged above).
            pdu, content_json = _parse_body(body)
            bucket: str | None = None
        else:
            pdu, content_json = _parse_body(body)
            origin = await self._authenticate(request, content_json)
            bucket = self._charge_claimed(origin, pdu)
            room = await self._room_for(pdu)
        room_version = get_room_version(room.room_version)
        validate_pdu(room_version, pdu)
        if not check_content_hash(pdu):
            raise BadJSON("The event's content hash (hashes.sha256) does not match its content")
        try:
            signing_bytes = redacted_signing_bytes(room_version, pdu)
        except ValueError as exc:  # validate_pdu already checked canonical values
            raise BadJSON(f"The event cannot be redacted and encoded: {exc}") from None
        reference_hash = hashlib.sha256(signing_bytes).digest()
        if room_version.event_id_in_json:
            event_id = str(pdu["event_id"])  # validate_pdu checked its shape
        else:
            event_id = event_id_from_reference_hash(room_version, reference_hash)
        self._check_path_event_id(path_event_id, event_id)
        sender_signed = await self._verify_event_signatures(room_version, pdu, signing_bytes)
        checked = CheckedEvent(
            content_json=content_json,
            room_id=room.room_id,
            room_version=room.room_version,
            event_id=event_id,
            reference_hash=encode_base64(reference_hash),
            policy_state=_is_policy_state_event(pdu),
            sender_server=_sender_server(pdu),
            sender_signed=sender_signed,
        )
        self._checked.put(digest, checked)
        if (
            bucket == OTHERS_BUCKET
            and self._rate_limiter is not None
            and self._verdicts.cached(event_id) is not None
        ):
            self._rate_limiter.refund(origin, bucket=OTHERS_BUCKET)  # a cached answer
        return await self._judge(endpoint, checked, room, origin, body, signing_bytes)

    async def _authenticate(self, request: Request, content_json: bytes) -> ServerName:
        """The request's X-Matrix origin (every request; the rate limit comes next)."""
        return await verify_request_json(
            request.method,
            _request_target(request),
            content_json,
            request.headers.getlist("authorization"),
            self._server_name,
            self._keyring,
            requester=client_address(request),
        )

    def _charge_checked(self, origin: str, checked: CheckedEvent) -> None:
        """The rate limit for a body whose event checks were done before (step 4)."""
        limiter = self._rate_limiter
        if limiter is None:
            return
        if checked.sender_server == origin:
            limiter.check(origin)
        elif self._verdicts.cached(checked.event_id) is None:
            limiter.check(origin, bucket=OTHERS_BUCKET)
        # else: another server's event with the verdict in memory: free.

    def _charge_claimed(self, origin: str, pdu: dict[str, Any]) -> str | None:
        """The rate limit for a new body, by its claimed sender; the bucket charged."""
        limiter = self._rate_limiter
        if limiter is None:
            return None
        bucket = "" if _sender_server(pdu) == origin else OTHERS_BUCKET
        limiter.check(origin, bucket=bucket)
        return bucket

    @staticmethod
    def _check_path_event_id(path_event_id: str | None, event_id: str) -> None:
        if path_event_id is not None and path_event_id != event_id:
            raise InvalidParam(
                f"The event ID in the path ({path_event_id}) is not the event's ID ({event_id})"
            )

    async def _judge(
        self,
        endpoint: Endpoint,
        checked: CheckedEvent,
        room: Room,
        origin: str,
        body: bytes,
        signing_bytes: bytes | None,
    ) -> Decision:
        """The decision for an event that passed every check.

        ``signing_bytes`` are the redacted event's canonical bytes when this request
        computed them; a repeat that needs a signature nobody cached makes them again.
        """
        event_id = checked.event_id
        if checked.policy_state:
            # Always signed: a room must be able to replace or remove its policy server.
            return Decision(event_id, signature=self._sign(checked, signing_bytes))
        entry = self._verdicts.remembered(event_id) or await self._verdicts.get(
            EvaluationRequest(
                event_id=event_id,
                reference_hash=checked.reference_hash,
                room_version=checked.room_version,
                community_id=room.community_id,
                origin=origin,
                source="check" if endpoint is Endpoint.CHECK else "sign",
                pdu=body,
                sender_signed=checked.sender_signed,
            )
        )
        if entry.reference_hash != checked.reference_hash:
            logger.warning(
                "refused: event ID reused for different content",
                extra={"event_id": event_id, "origin": origin},
            )
            return Decision(event_id, refusal=REUSED_ID_MESSAGE)
        if entry.prohibited:
            if logger.isEnabledFor(logging.DEBUG):
                # A line per refused request only at DEBUG: a refused event asked about
                # by fifty servers would make fifty. The worker logs its verdict once at
                # INFO; ``warden_sign_requests_total`` counts the requests.
                logger.debug(
                    "refused",
                    extra={"event_id": event_id, "origin": origin, "harms": list(entry.harms)},
                )
            own = entry.sender_server_first
            if own and origin != own and self._moderation is not None:
                # Its sender's server asked first (no redaction then); another server
                # has it now: the moderator must act on it (once).
                self._moderation.request(event_id, origin)
            return Decision(event_id, refusal=REFUSED_MESSAGE, harms=entry.harms)
        signature = entry.signature
        if signature is None:
            # Requests that waited on the same lookup resume one after another: the
            # first signs, the others find its signature cached.
            cached = self._verdicts.cached(event_id)
            signature = cached.signature if cached is not None else None
        if signature is None:
            # Same reference hash, same signing bytes: the signature can be reused.
            signature = self._sign(checked, signing_bytes)
            self._verdicts.remember_signature(event_id, signature)
        return Decision(event_id, signature=signature)

    async def _room_for(self, pdu: dict[str, Any]) -> Room:
        room_id = pdu.get("room_id")
        if room_id is None and pdu.get("type") == "m.room.create":
            # Room version 12 create events carry no room_id: it is their hash.
            try:
                room_id = room_id_from_create_event(pdu)
            except ValueError:
                raise NotFound("This room is not protected by this policy server") from None
        if not isinstance(room_id, str):
            raise BadJSON("invalid PDU: 'room_id' must be a string")
        if len(room_id.encode("utf-8")) > MAX_ID_LENGTH:
            raise BadJSON(f"invalid PDU: 'room_id' is longer than {MAX_ID_LENGTH}")
        room = await self._rooms.get(room_id)
        if room is None:
            raise NotFound("This room is not protected by this policy server")
        return room

    async def _verify_event_signatures(
        self, room_version: RoomVersion, pdu: dict[str, Any], signing_bytes: bytes
    ) -> bool:
        """Check the signatures of every server required to sign (sender's, and so on);
        return whether a signature by the sender's server verified.

        From room version 5 keys must have been valid at the event's
        ``origin_server_ts``; before that any key the server ever had will do (as in
        Synapse). The sender's server is always required except for a third-party
        invite; its signature on one is checked if present, else the event is judged
        without being attributed to its sender (a room v1/v2 event ID's server, chosen
        by whoever made the event, proves nothing about the sender).
        """
        try:
            required = servers_required_to_sign(room_version, pdu)
        except EventSignatureError as exc:
            raise BadJSON(f"invalid PDU: {exc}") from None
        at_ms = int(pdu["origin_server_ts"]) if room_version.enforce_key_validity else 0
        signatures: dict[str, Any] = pdu["signatures"]  # validate_pdu checked the shape
        verify_keys: dict[str, dict[str, EventVerifyKey]] = {}
        for server in required:
            by_server = signatures.get(server)
            if not isinstance(by_server, dict):
                raise BadJSON(f"The event is not signed by {server}")
            key_ids = [k for k in by_server if k.startswith("ed25519:")]
            if len(key_ids) > MAX_KEYS_PER_SIGNING_SERVER:
                raise BadJSON(f"The event carries too many signatures by {server}")
            found: dict[str, EventVerifyKey] = {}
            for key_id in key_ids:
                try:
                    found[key_id] = await self._keyring.get_verify_key(
                        ServerName(server), KeyID(key_id), at_ms=at_ms
                    )
                except KeyringError:
                    continue  # verify_sender_signature needs at least one known key
            verify_keys[server] = found
        try:
            verify_sender_signature(
                room_version, pdu, verify_keys, servers=required, signing_bytes=signing_bytes
            )
        except EventSignatureError as exc:
            raise BadJSON(f"The event's signatures do not verify: {exc}") from None
        # validate_pdu checked the sender is "@localpart:server".
        sender_server = str(pdu["sender"]).partition(":")[2]
        if sender_server in required:
            return True
        by_sender = signatures.get(sender_server)  # only third-party invites get here
        if not isinstance(by_sender, dict):
            return False
        key_ids = [k for k in by_sender if k.startswith("ed25519:")]
        keys: dict[str, EventVerifyKey] = {}
        for key_id in key_ids[:MAX_KEYS_PER_SIGNING_SERVER]:
            try:
                keys[key_id] = await self._keyring.get_verify_key(
                    ServerName(sender_server), KeyID(key_id), at_ms=at_ms
                )
            except KeyringError:
                continue
        try:
            verify_sender_signature(
                room_version,
                pdu,
                {sender_server: keys},
                servers=(sender_server,),
                signing_bytes=signing_bytes,
            )
        except EventSignatureError:
            return False
        return True

    def _sign(self, checked: CheckedEvent, signing_bytes: bytes | None) -> str:
        """Our policy signature over the redacted event's canonical bytes.

        The same as ``compute_event_signature(room_version, pdu, server, policy_key,
        "ed25519:policy_server")``, without redacting and encoding the event again when
        this request already did.
        """
        if signing_bytes is None:
            pdu = parse_canonical(checked.content_json)
            signing_bytes = redacted_signing_bytes(get_room_version(checked.room_version), pdu)
        return encode_base64(self._identity.policy_key.sign(signing_bytes).signature)

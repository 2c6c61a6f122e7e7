"""Receiving federation: ``/send`` transactions, and the user queries other servers make.

``PUT /_matrix/federation/v1/send/{txnId}``
    0. a transaction ID longer than ``MAX_TXN_ID_BYTES`` is 400 ``M_INVALID_PARAM``
       (it becomes part of a Redis key);
    1. X-Matrix headers well formed and the origin's key obtained (401) before the body
       is read; then body at most ``MAX_TRANSACTION_BYTES`` (413), canonical JSON (400
       ``M_NOT_JSON`` / ``M_BAD_JSON``), the signature over it (401); the body's
       ``origin``, when given, must be the authenticated one (403);
    2. ``pdus`` a list of at most 50, ``edus`` (optional) a list of at most 100 (the
       spec's limits; 400 ``M_BAD_JSON``);
    3. the origin's budget (``PS_SEND_RATE_LIMIT_PER_ORIGIN`` per
       ``PS_SEND_RATE_LIMIT_WINDOW_SECONDS``, shared by the replicas like the policy
       API's limit): a transaction costs 1 plus its number of PDUs; past it 429
       ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``, and the origin retries later;
    4. deduplication per origin: Redis ``transaction(origin, txn_id)`` is claimed with
       SET NX; a repeat gets the answer cached there (``TRANSACTION_CACHE_SECONDS``)
       without being processed again. Transactions without PDUs (typing, receipts,
       presence: most of a busy server's traffic) skip this: handling them again costs
       nothing, and they would only fill Redis. A repeat that arrives while the first
       is still being handled waits for its answer a little, then handles the
       transaction itself (harmless: see 6);
    5. the rooms the PDUs name are looked up in one query (``RoomCache.get_many``); each
       PDU of a protected room is checked cheaply for the room's version (event ID, the
       spec's 65,536-byte size, structure, content hash) and published to JetStream
       (``INBOUND_PDU_SUBJECT``) for the filter workers' room-state consumer, which checks
       signatures, learns state and judges events that bypassed the policy server. PDUs
       of rooms Warden does not protect are left out of the answer (their room version,
       hence their event ID, is unknown), like policyserv; invalid or oversized ones get
       ``{"error": ...}`` and are not published; accepted ones ``{}``;
    6. ``Nats-Msg-Id`` is the event ID, the origin and a digest of the PDU's ``hashes``
       and ``signatures`` (``<event ID>/<digest>@<origin>``; server names hold no "@"),
       so a transaction handled twice is stored once in the stream, while neither a
       copy relayed first by a server that is not in the room nor a copy with a
       corrupted signature (both of which the worker drops) can make JetStream drop the
       real one as a duplicate. The digest covers everything but ``unsigned``: the
       content hash, which the gateway checked, covers the rest;
    7. EDUs are accepted and dropped.

    A publish that fails (NATS down, or the inbound stream full: it refuses new
    messages rather than dropping unjudged ones) is 503 and nothing is cached, so the
    origin retries the transaction; counted in
    ``warden_inbound_publish_failures_total{reason}``.
    Bad input is always a 4xx with a Matrix error, never a 500.

``GET /_matrix/federation/v1/user/devices/{userId}``
    Warden's user: ``{"user_id", "stream_id": 1, "devices": []}`` (servers that cannot
    list a member's devices mark it offline); anyone else: 404 ``M_NOT_FOUND``.

``GET /_matrix/federation/v1/query/profile?user_id=&field=``
    Warden's user: ``{"displayname": DISPLAYNAME}`` (``{}`` for another field); anyone
    else: 404 ``M_NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any, Protocol

import nats.errors
import orjson
import redis.asyncio as aioredis
from nats.js import JetStreamContext
from nats.js.errors import APIError
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from unpaddedbase64 import encode_base64

from warden import redis_keys
from warden.bus.subjects import (
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_ROOM_ID,
    HEADER_ROOM_VERSION,
    INBOUND_PDU_SUBJECT,
)
from warden.federation.xmatrix import VerifyKeySource, authenticate_headers, verify_request
from warden.matrix.canonical_json import CanonicalJSONError, parse_canonical
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
)
from warden.matrix.event_hashes import (
    check_content_hash,
    event_id_from_reference_hash,
    redacted_signing_bytes,
    room_id_from_create_event,
)
from warden.matrix.pdu import MAX_ID_LENGTH, validate_pdu
from warden.matrix.room_versions import RoomVersion, get_room_version
from warden.runtime.redis_outage import RedisOutage, is_redis_outage
from warden.storage.database import DATABASE_ERRORS
from warden.storage.records import Room
from warden.telemetry.tracing import inject_headers, tracer
from warden_gateway.client_address import client_address
from warden_gateway.errors import TemporarilyUnavailable, error_response
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.request_body import read_limited_body

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

SEND_PATH = "/_matrix/federation/v1/send/{txn_id}"
DEVICES_PATH = "/_matrix/federation/v1/user/devices/{user_id}"
PROFILE_PATH = "/_matrix/federation/v1/query/profile"

MAX_PDUS = 50  # spec: a transaction carries at most 50 PDUs
MAX_EDUS = 100  # and 100 EDUs
# The spec caps a PDU at 65,536 bytes and a transaction at 50 PDUs and 100 EDUs: 50 full
# PDUs are 3.125 MiB, which leaves about 9 KiB per EDU. The EDUs Warden's user gets
# (typing, receipts, presence, device list updates) are far smaller; to-device EDUs, the
# large kind, go to devices and it has none. A transaction that still does not fit is
# refused with 413, and its origin splits nothing: so the cap stays well above need.
MAX_TRANSACTION_BYTES = 4 * 1024 * 1024
# The spec's limit on a PDU (in the federation format); a larger one gets an error in
# the answer and is not published (JetStream would take up to 1 MiB, then fail the whole
# transaction on every retry).
MAX_PDU_BYTES = 65536
# Transaction IDs are opaque, but they are kept in Redis keys for a while; homeservers
# use short ones (Synapse: a timestamp and a counter).
MAX_TXN_ID_BYTES = 255
# A repeat answers from the cache this long: the inbound stream's duplicate window.
# Origins retry failed transactions for hours with backoff, but a later repeat is
# harmless (see the docstring); what bounds Redis memory is this times the origins'
# /send budgets.
TRANSACTION_CACHE_SECONDS = 600
# The claim of a transaction being handled; past it another request handles it again.
TRANSACTION_CLAIM_SECONDS = 60
# How long a repeat waits for the first request's answer before handling it itself.
DUPLICATE_WAIT_SECONDS = 5.0
PUBLISH_TIMEOUT_SECONDS = 5.0
_PENDING = b"pending"
_NO_PDUS_ANSWER = orjson.dumps({"pdus": {}})

DISPLAYNAME = "Warden policy server"

TRANSACTIONS = Counter(
    "warden_federation_transactions_total",
    "Federation /send transactions, by outcome (processed, duplicate, bad_json, not_json, "
    "too_large, unauthorized, forbidden, rate_limited, invalid_param, unavailable, "
    "other_error).",
    ["outcome"],
)
INBOUND_PDUS = Counter(
    "warden_inbound_pdus_total",
    "PDUs received in /send transactions, by outcome (published, duplicate: already in "
    "the stream, invalid, too_large, unknown_room, not_object).",
    ["outcome"],
)
INBOUND_PUBLISH_FAILURES = Counter(
    "warden_inbound_publish_failures_total",
    "Inbound PDUs that could not be put on the inbound stream (the transaction was "
    "answered 503 and is retried by its origin), by reason (stream_full, timeout, error).",
    ["reason"],
)

_DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, RedisError)


class MissingParam(MatrixError):
    """400 ``M_MISSING_PARAM``: a required query parameter is absent."""

    errcode = "M_MISSING_PARAM"
    status = 400


class RoomLookup(Protocol):
    """What this module needs from a room cache (``RoomCache`` implements it)."""

    async def get_many(self, room_ids: list[str]) -> dict[str, Room | None]:
        """Each room's record, or None when it is not protected (one query at most)."""
        ...


def _request_target(request: Request) -> str:
    """The request target as received (path and query, percent-encoding untouched)."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _txn_id(request: Request) -> str:
    """The path's transaction ID; 400 ``M_INVALID_PARAM`` when longer than the cap."""
    txn_id = str(request.path_params["txn_id"])
    if len(txn_id.encode("utf-8", "surrogatepass")) > MAX_TXN_ID_BYTES:
        raise InvalidParam(f"Transaction IDs are at most {MAX_TXN_ID_BYTES} bytes")
    return txn_id


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _outcome(exc: MatrixError) -> str:
    for cls, name in (
        (TooLarge, "too_large"),
        (NotJSON, "not_json"),
        (BadJSON, "bad_json"),
        (Unauthorized, "unauthorized"),
        (Forbidden, "forbidden"),
        (LimitExceeded, "rate_limited"),
        (InvalidParam, "invalid_param"),
        (TemporarilyUnavailable, "unavailable"),
    ):
        if isinstance(exc, cls):
            return name
    return "other_error"


def _event_id(room_version: RoomVersion, pdu: dict[str, Any]) -> str | None:
    """The PDU's event ID, or None when it cannot be computed (not canonical, no ID)."""
    if room_version.event_id_in_json:
        event_id = pdu.get("event_id")
        if not isinstance(event_id, str) or len(event_id) > MAX_ID_LENGTH:
            return None
        return event_id if event_id.startswith("$") and ":" in event_id else None
    try:
        digest = hashlib.sha256(redacted_signing_bytes(room_version, pdu)).digest()
    except (ValueError, TypeError, AttributeError):
        return None
    return str(event_id_from_reference_hash(room_version, digest))


def _message_id(event_id: str, pdu: dict[str, Any]) -> str:
    """``Nats-Msg-Id`` for a PDU: its event ID and a digest of its hashes and signatures.

    Copies that differ only in ``unsigned`` (each relaying server has its own) share it;
    a copy with other signatures does not, so JetStream's deduplication cannot let a
    corrupted copy that arrived first suppress the real one.
    """
    covered = orjson.dumps(
        {"hashes": pdu.get("hashes"), "signatures": pdu.get("signatures")},
        option=orjson.OPT_SORT_KEYS,
    )
    return f"{event_id}/{encode_base64(hashlib.sha256(covered).digest()[:18])}"


def _room_id_of(pdu: Any) -> str | None:
    """The room a PDU names (a v12 create event's is its hash), or None if none or bad."""
    if not isinstance(pdu, dict):
        return None
    room_id = pdu.get("room_id")
    if room_id is None and pdu.get("type") == "m.room.create":
        try:
            room_id = room_id_from_create_event(pdu)
        except ValueError:
            return None
    if not isinstance(room_id, str) or len(room_id.encode("utf-8")) > MAX_ID_LENGTH:
        return None
    return room_id


def _publish_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
        return "timeout"
    if isinstance(exc, APIError) and exc.err_code in _STREAM_FULL_CODES:
        return "stream_full"
    return "error"


# JetStream's answers to a publish into a stream at a limit with discard=new: maximum
# bytes, messages or messages per subject exceeded.
_STREAM_FULL_CODES = frozenset({10047, 10077, 10078})


class FederationInbound:
    """Handlers for ``/send``, user devices and profile queries."""

    def __init__(
        self,
        *,
        server_name: str,
        local_user_id: str,
        keyring: VerifyKeySource,
        rooms: RoomLookup,
        redis: aioredis.Redis,
        js: JetStreamContext,
        subject: str = INBOUND_PDU_SUBJECT,
        max_body_bytes: int = MAX_TRANSACTION_BYTES,
        max_pdu_bytes: int = MAX_PDU_BYTES,
        rate_limiter: OriginRateLimiter | None = None,
    ) -> None:
        self._server_name = server_name
        self._local_user_id = local_user_id
        self._keyring = keyring
        self._rooms = rooms
        self._redis = redis
        self._redis_outage = RedisOutage("send_dedup")
        self._js = js
        self._subject = subject
        self._max_body_bytes = max_body_bytes
        self._max_pdu_bytes = max_pdu_bytes
        self._rate_limiter = rate_limiter

    def routes(self) -> list[Route]:
        """The routes this module serves."""
        return [
            Route(SEND_PATH, self.send, methods=["PUT"]),
            Route(DEVICES_PATH, self.user_devices, methods=["GET"]),
            Route(PROFILE_PATH, self.query_profile, methods=["GET"]),
        ]

    # --- /send ---

    async def send(self, request: Request) -> Response:
        """``PUT /_matrix/federation/v1/send/{txnId}``."""
        outcome = "other_error"
        try:
            with _tracer.start_as_current_span("federation.send"):
                answer, outcome = await self._transaction(request)
            return Response(answer, media_type="application/json")
        except MatrixError as exc:
            outcome = _outcome(exc)
            return error_response(exc)
        except _DEPENDENCY_ERRORS as exc:
            outcome = "unavailable"
            logger.warning(
                "transaction failed on a dependency",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )
            return error_response(
                TemporarilyUnavailable("Temporarily unavailable; retry", retry_after_seconds=5)
            )
        finally:
            TRANSACTIONS.labels(outcome).inc()

    async def _transaction(self, request: Request) -> tuple[bytes, str]:
        txn_id = _txn_id(request)
        # Before the body is read (review H7): a missing or malformed X-Matrix header, or
        # an origin whose key cannot be had, costs no read and no JSON parse.
        auth = await authenticate_headers(
            request.headers.getlist("authorization"),
            self._server_name,
            self._keyring,
            requester=client_address(request),
        )
        body = await read_limited_body(request, self._max_body_bytes)
        try:
            txn = parse_canonical(body)
        except CanonicalJSONError as exc:
            raise BadJSON(f"Request body is not valid Matrix JSON: {exc}") from None
        except ValueError:
            raise NotJSON("Request body is not JSON") from None
        if not isinstance(txn, dict):
            raise NotJSON("Request body must be a JSON object (the transaction)")
        origin = auth.verify_content(request.method, _request_target(request), txn)
        claimed_origin = txn.get("origin")
        if claimed_origin is not None and claimed_origin != origin:
            raise Forbidden("The transaction's origin is not the authenticated server")
        pdus = txn.get("pdus")
        edus = txn.get("edus", [])
        if not isinstance(pdus, list):
            raise BadJSON("'pdus' must be a list")
        if not isinstance(edus, list):
            raise BadJSON("'edus' must be a list")
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            raise BadJSON(f"A transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs")
        if self._rate_limiter is not None:
            self._rate_limiter.check(origin, cost=1 + len(pdus))

        if not pdus:
            logger.debug("transaction", extra={"origin": origin, "pdus": 0, "edus": len(edus)})
            return _NO_PDUS_ANSWER, "processed"
        key = redis_keys.transaction(origin, txn_id)
        claimed = await self._claim(key)
        if not claimed:
            cached = await self._cached_answer(key)
            if cached is not None:
                return cached, "duplicate"
        try:
            results = await self._handle_pdus(origin, pdus)
        except BaseException:
            if claimed:
                await self._forget(key)
            raise
        answer = orjson.dumps({"pdus": results})
        if not self._redis_outage.skipping:
            try:
                await self._redis.set(key, answer, ex=TRANSACTION_CACHE_SECONDS)
            except RedisError as exc:
                self._redis_failed(exc)
                logger.warning("could not cache a transaction's answer", extra={"error": str(exc)})
        logger.debug(
            "transaction",
            extra={"origin": origin, "pdus": len(pdus), "edus": len(edus)},
        )
        return answer, "processed"

    def _redis_failed(self, exc: RedisError) -> None:
        if is_redis_outage(exc):
            self._redis_outage.failed(exc)

    async def _claim(self, key: str) -> bool:
        # Without Redis there is no deduplication, which is harmless (see step 5). After
        # a failure Redis is skipped for a moment (warden.runtime.redis_outage): a Redis
        # that hangs would otherwise cost every transaction its socket timeouts.
        if self._redis_outage.skipping:
            self._redis_outage.fell_back()
            return True
        try:
            claimed = await self._redis.set(key, _PENDING, nx=True, ex=TRANSACTION_CLAIM_SECONDS)
        except RedisError as exc:
            self._redis_failed(exc)
            self._redis_outage.fell_back()
            logger.warning("transaction dedup unavailable", extra={"error": str(exc)})
            return True
        self._redis_outage.answered()
        return bool(claimed)

    async def _cached_answer(self, key: str) -> bytes | None:
        deadline = time.monotonic() + DUPLICATE_WAIT_SECONDS
        delay = 0.01
        while True:
            try:
                value = await self._redis.get(key)
            except RedisError:
                return None
            if value is None:
                return None  # the first attempt failed and gave up its claim
            if value != _PENDING:
                return value.encode() if isinstance(value, str) else bytes(value)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _forget(self, key: str) -> None:
        if self._redis_outage.skipping:
            return  # the claim expires by itself
        with contextlib.suppress(RedisError):  # else the claim expires by itself
            await self._redis.delete(key)

    async def _handle_pdus(self, origin: str, pdus: list[Any]) -> dict[str, dict[str, str]]:
        room_ids = [_room_id_of(pdu) for pdu in pdus]
        wanted = [r for r in room_ids if r is not None]
        rooms = await self._rooms.get_many(wanted) if wanted else {}
        results: dict[str, dict[str, str]] = {}
        to_publish: dict[str, tuple[str, Room, bytes]] = {}
        for pdu, room_id in zip(pdus, room_ids, strict=True):
            item = self._check_pdu(pdu, None if room_id is None else rooms.get(room_id))
            if item is None:
                continue
            event_id, outcome = item
            if isinstance(outcome, str):
                results[event_id] = {"error": outcome}
                continue
            results[event_id] = {}
            msg_id, room, payload = outcome
            to_publish.setdefault(msg_id, (event_id, room, payload))  # once per transaction
        await asyncio.gather(
            *(self._publish(origin, m, e, r, p) for m, (e, r, p) in to_publish.items())
        )
        return results

    def _check_pdu(
        self, pdu: Any, room: Room | None
    ) -> tuple[str, str | tuple[str, Room, bytes]] | None:
        """``(event_id, error)`` or ``(event_id, (message ID, room, payload))``; None to
        leave the PDU out of the answer (not an object, or not a protected room)."""
        if not isinstance(pdu, dict):
            INBOUND_PDUS.labels("not_object").inc()
            return None
        if room is None:
            INBOUND_PDUS.labels("unknown_room").inc()
            return None
        room_version = get_room_version(room.room_version)
        event_id = _event_id(room_version, pdu)
        if event_id is None:
            INBOUND_PDUS.labels("invalid").inc()
            return None
        # What is published, and (same length as canonical JSON: compact, UTF-8, the
        # same escapes; only the key order differs) what the spec's size limit measures.
        payload = orjson.dumps(pdu)
        if len(payload) > self._max_pdu_bytes:
            INBOUND_PDUS.labels("too_large").inc()
            return event_id, f"PDU larger than {self._max_pdu_bytes} bytes"
        try:
            validate_pdu(room_version, pdu)
        except MatrixError as exc:
            INBOUND_PDUS.labels("invalid").inc()
            return event_id, exc.error
        if not check_content_hash(pdu):
            INBOUND_PDUS.labels("invalid").inc()
            return event_id, "content hash (hashes.sha256) does not match"
        return event_id, (_message_id(event_id, pdu), room, payload)

    async def _publish(
        self, origin: str, msg_id: str, event_id: str, room: Room, payload: bytes
    ) -> None:
        headers = inject_headers(
            {
                HEADER_ORIGIN: origin,
                HEADER_ROOM_VERSION: room.room_version,
                HEADER_ROOM_ID: room.room_id,
                HEADER_EVENT_ID: event_id,
                # Unambiguous: the digest has a fixed length and server names hold no "@".
                "Nats-Msg-Id": f"{msg_id}@{origin}",
            }
        )
        try:
            ack = await self._js.publish(
                self._subject, payload, headers=headers, timeout=PUBLISH_TIMEOUT_SECONDS
            )
        except Exception as exc:  # NATS down, slow, or the stream full: the origin retries
            reason = _publish_failure_reason(exc)
            INBOUND_PUBLISH_FAILURES.labels(reason).inc()
            logger.warning(
                "could not publish an inbound PDU",
                extra={
                    "event_id": event_id,
                    "reason": reason,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            raise TemporarilyUnavailable(
                "Could not queue the transaction; retry", retry_after_seconds=5
            ) from None
        INBOUND_PDUS.labels("duplicate" if ack.duplicate else "published").inc()

    # --- users ---

    async def _authenticate(self, request: Request) -> str:
        return await verify_request(
            request.method,
            _request_target(request),
            None,
            request.headers.getlist("authorization"),
            self._server_name,
            self._keyring,
            requester=client_address(request),
        )

    async def user_devices(self, request: Request) -> Response:
        """``GET /_matrix/federation/v1/user/devices/{userId}``."""
        try:
            await self._authenticate(request)
            user_id = str(request.path_params["user_id"])
            if user_id != self._local_user_id:
                raise NotFound("No such user on this server")
            return _json({"user_id": user_id, "stream_id": 1, "devices": []})
        except MatrixError as exc:
            return error_response(exc)
        except _DEPENDENCY_ERRORS:
            return error_response(TemporarilyUnavailable("Temporarily unavailable; retry"))

    async def query_profile(self, request: Request) -> Response:
        """``GET /_matrix/federation/v1/query/profile``."""
        try:
            await self._authenticate(request)
            user_id = request.query_params.get("user_id")
            if not user_id:
                raise MissingParam("Missing query parameter 'user_id'")
            if user_id != self._local_user_id:
                raise NotFound("No such user on this server")
            field = request.query_params.get("field")
            if field is None or field == "displayname":
                return _json({"displayname": DISPLAYNAME})
            return _json({})
        except MatrixError as exc:
            return error_response(exc)
        except _DEPENDENCY_ERRORS:
            return error_response(TemporarilyUnavailable("Temporarily unavailable; retry"))

"""Receiving federation: ``/send`` transactions, and the user queries other servers make.

``PUT /_matrix/federation/v1/send/{txnId}``
    1. X-Matrix headers well formed and the origin's key obtained (401) before the body
       is read; then body at most ``MAX_TRANSACTION_BYTES`` (413), canonical JSON (400
       ``M_NOT_JSON`` / ``M_BAD_JSON``), the signature over it (401); the body's
       ``origin``, when given, must be the authenticated one (403);
    2. ``pdus`` a list of at most 50, ``edus`` (optional) a list of at most 100 (the
       spec's limits; 400 ``M_BAD_JSON``);
    3. deduplication per origin: Redis ``transaction(origin, txn_id)`` is claimed with
       SET NX; a repeat gets the answer cached there (an hour) without being processed
       again. A repeat that arrives while the first is still being handled waits for its
       answer a little, then handles the transaction itself (harmless: see 5);
    4. each PDU of a protected room is checked cheaply for the room's version (structure,
       content hash; its event ID computed) and published to JetStream
       (``INBOUND_PDU_SUBJECT``) for the filter workers' room-state consumer, which checks
       signatures, learns state and judges events that bypassed the policy server. PDUs
       of rooms Warden does not protect are left out of the answer (their room version,
       hence their event ID, is unknown), like policyserv; invalid ones get
       ``{"error": ...}``; accepted ones ``{}``;
    5. ``Nats-Msg-Id`` is the event ID, so the same event relayed by several origins, or
       a transaction handled twice, is stored once in the stream;
    6. EDUs are accepted and dropped.

    A publish that fails is 503 (nothing cached: the origin retries the transaction).
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

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.js import JetStreamContext
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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
from warden.storage.records import Room
from warden.telemetry.tracing import inject_headers, tracer
from warden_gateway.client_address import client_address
from warden_gateway.errors import TemporarilyUnavailable, error_response
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
# A repeat answers from the cache this long (origins retry failed transactions for
# hours with backoff, but a repeat after a whole hour is harmless: see the docstring).
TRANSACTION_CACHE_SECONDS = 3600
# The claim of a transaction being handled; past it another request handles it again.
TRANSACTION_CLAIM_SECONDS = 60
# How long a repeat waits for the first request's answer before handling it itself.
DUPLICATE_WAIT_SECONDS = 5.0
PUBLISH_TIMEOUT_SECONDS = 5.0
_PENDING = b"pending"

DISPLAYNAME = "Warden policy server"

TRANSACTIONS = Counter(
    "warden_federation_transactions_total",
    "Federation /send transactions, by outcome (processed, duplicate, bad_json, not_json, "
    "too_large, unauthorized, forbidden, unavailable, other_error).",
    ["outcome"],
)
INBOUND_PDUS = Counter(
    "warden_inbound_pdus_total",
    "PDUs received in /send transactions, by outcome (published, duplicate: already in "
    "the stream, invalid, unknown_room, not_object).",
    ["outcome"],
)

_DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    RedisError,
    OSError,
)


class MissingParam(MatrixError):
    """400 ``M_MISSING_PARAM``: a required query parameter is absent."""

    errcode = "M_MISSING_PARAM"
    status = 400


class RoomLookup(Protocol):
    """What this module needs from a room cache (``RoomCache`` implements it)."""

    async def get(self, room_id: str) -> Room | None:
        """The room's record, or None when it is not protected."""
        ...


def _request_target(request: Request) -> str:
    """The request target as received (path and query, percent-encoding untouched)."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _outcome(exc: MatrixError) -> str:
    for cls, name in (
        (TooLarge, "too_large"),
        (NotJSON, "not_json"),
        (BadJSON, "bad_json"),
        (Unauthorized, "unauthorized"),
        (Forbidden, "forbidden"),
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
    ) -> None:
        self._server_name = server_name
        self._local_user_id = local_user_id
        self._keyring = keyring
        self._rooms = rooms
        self._redis = redis
        self._js = js
        self._subject = subject
        self._max_body_bytes = max_body_bytes

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

        txn_id = str(request.path_params["txn_id"])
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
        try:
            await self._redis.set(key, answer, ex=TRANSACTION_CACHE_SECONDS)
        except RedisError as exc:
            logger.warning("could not cache a transaction's answer", extra={"error": str(exc)})
        logger.debug(
            "transaction",
            extra={"origin": origin, "pdus": len(pdus), "edus": len(edus)},
        )
        return answer, "processed"

    async def _claim(self, key: str) -> bool:
        try:
            return bool(await self._redis.set(key, _PENDING, nx=True, ex=TRANSACTION_CLAIM_SECONDS))
        except RedisError as exc:
            # Without Redis there is no deduplication, which is harmless (see step 5).
            logger.warning("transaction dedup unavailable", extra={"error": str(exc)})
            return True

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
        with contextlib.suppress(RedisError):  # else the claim expires by itself
            await self._redis.delete(key)

    async def _handle_pdus(self, origin: str, pdus: list[Any]) -> dict[str, dict[str, str]]:
        checked = await asyncio.gather(*(self._check_pdu(pdu) for pdu in pdus))
        results: dict[str, dict[str, str]] = {}
        to_publish: list[tuple[str, Room, dict[str, Any]]] = []
        for item in checked:
            if item is None:
                continue
            event_id, room, pdu, error = item
            if error is not None:
                INBOUND_PDUS.labels("invalid").inc()
                results[event_id] = {"error": error}
                continue
            results[event_id] = {}
            if any(e == event_id for e, _, _ in to_publish):
                continue  # the same event twice in one transaction
            to_publish.append((event_id, room, pdu))
        await asyncio.gather(*(self._publish(origin, e, r, p) for e, r, p in to_publish))
        return results

    async def _check_pdu(self, pdu: Any) -> tuple[str, Room, dict[str, Any], str | None] | None:
        """``(event_id, room, pdu, error or None)``, or None to leave the PDU out."""
        if not isinstance(pdu, dict):
            INBOUND_PDUS.labels("not_object").inc()
            return None
        room_id = pdu.get("room_id")
        if room_id is None and pdu.get("type") == "m.room.create":
            try:
                room_id = room_id_from_create_event(pdu)
            except ValueError:
                room_id = None
        if not isinstance(room_id, str) or len(room_id.encode("utf-8")) > MAX_ID_LENGTH:
            INBOUND_PDUS.labels("unknown_room").inc()
            return None
        room = await self._rooms.get(room_id)
        if room is None:
            INBOUND_PDUS.labels("unknown_room").inc()
            return None
        room_version = get_room_version(room.room_version)
        event_id = _event_id(room_version, pdu)
        if event_id is None:
            INBOUND_PDUS.labels("invalid").inc()
            return None
        try:
            validate_pdu(room_version, pdu)
        except MatrixError as exc:
            return event_id, room, pdu, exc.error
        if not check_content_hash(pdu):
            return event_id, room, pdu, "content hash (hashes.sha256) does not match"
        return event_id, room, pdu, None

    async def _publish(self, origin: str, event_id: str, room: Room, pdu: dict[str, Any]) -> None:
        headers = inject_headers(
            {
                HEADER_ORIGIN: origin,
                HEADER_ROOM_VERSION: room.room_version,
                HEADER_ROOM_ID: room.room_id,
                HEADER_EVENT_ID: event_id,
                "Nats-Msg-Id": event_id,
            }
        )
        try:
            ack = await self._js.publish(
                self._subject, orjson.dumps(pdu), headers=headers, timeout=PUBLISH_TIMEOUT_SECONDS
            )
        except Exception as exc:  # NATS down or slow: the origin retries the transaction
            logger.warning(
                "could not publish an inbound PDU",
                extra={"event_id": event_id, "error": f"{type(exc).__name__}: {exc}"},
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

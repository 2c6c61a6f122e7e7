"""Fetching one event over federation and verifying it before anything judges it.

Used by ``POST /_policyserv/v1/check/event_id`` when Warden has no verdict for the
event: ``GET /_matrix/federation/v1/event/{eventId}`` is sent to every server of
``PS_EVENT_FETCH_SERVERS`` at once (signed, through the federation client and its
network guard), and the first copy that verifies wins; the other requests are
cancelled. A copy verifies when:

* the answer holds exactly one PDU, no larger than ``PS_MAX_PDU_BYTES`` as canonical
  JSON (the answer itself is capped at ``PS_EVENT_FETCH_MAX_RESPONSE_BYTES``);
* its room is one the caller accepts (``room_version_for`` gives the room version of a
  protected room of the caller's community, None for any other room), and the PDU is
  well formed for that room version;
* its content hash matches, its ID (from the reference hash, or as minted for room
  versions 1 and 2) is the ID asked for, and every server required to sign it did
  (keys from the keyring, valid at ``origin_server_ts`` from room version 5).

Nothing a server sends is believed before that: a copy that fails is counted and
ignored, and if no copy verifies the fetch fails with the most useful reason (a server
that could not be reached may still have a good copy: ``EventFetchUnavailable``).

Bounds: each server's answer within ``PS_EVENT_FETCH_TIMEOUT_SECONDS``; the whole
fetch, including waiting for a slot and fetching signing keys, within
``PS_EVENT_FETCH_TOTAL_TIMEOUT_SECONDS``; at most ``PS_EVENT_FETCH_CONCURRENCY``
requests in flight per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from unpaddedbase64 import encode_base64

from warden.federation.client import FederationClient
from warden.federation.errors import (
    FederationError,
    HttpResponseError,
    ResponseTooLarge,
    TemporaryFederationError,
)
from warden.federation.snapshot import verify_signatures
from warden.federation.xmatrix import VerifyKeySource
from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.errors import MatrixError
from warden.matrix.event_hashes import (
    check_content_hash,
    event_id_from_reference_hash,
    redacted_signing_bytes,
    room_id_from_create_event,
)
from warden.matrix.event_signing import EventSignatureError, servers_required_to_sign
from warden.matrix.pdu import MAX_ID_LENGTH, validate_pdu
from warden.matrix.room_versions import get_room_version

logger = logging.getLogger(__name__)

EVENT_FETCH_ANSWERS = Counter(
    "warden_event_fetch_answers_total",
    "Answers of PS_EVENT_FETCH_SERVERS to event fetches, by outcome (verified, "
    "not_found, unavailable, error, too_large, bad_event, other_room, bad_hash, "
    "wrong_id, bad_signature, timeout: no answer within the total timeout).",
    ["outcome"],
)
EVENT_FETCHES = Counter(
    "warden_event_fetches_total",
    "Event fetches over federation, by result (verified, not_found, unverifiable, "
    "other_room, unavailable).",
    ["result"],
)
EVENT_FETCH_SECONDS = Histogram(
    "warden_event_fetch_seconds",
    "Time to fetch and verify one event from PS_EVENT_FETCH_SERVERS.",
)

EVENT_PATH = "/_matrix/federation/v1/event/"

# Outcomes that say a copy was served but must not be believed.
_UNVERIFIED = frozenset({"too_large", "bad_event", "bad_hash", "wrong_id", "bad_signature"})
# Outcomes after which asking again later may succeed.
_TRANSIENT = frozenset({"unavailable", "error", "timeout"})

RoomVersionFor = Callable[[str], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class FetchedEvent:
    """An event whose hash, ID and signatures verified."""

    event_id: str
    room_id: str
    room_version: str
    pdu: dict[str, Any]
    canonical: bytes  # the PDU as canonical JSON
    reference_hash: str  # unpadded base64 SHA-256 of the redacted event
    sender_signed: bool  # the sender's server's signature was required and verified
    served_by: str


class EventFetchError(Exception):
    """No verified copy of the event; the message says why (no secrets, no addresses)."""


class EventNotFound(EventFetchError):
    """Every server answered that it does not have the event (or will not give it)."""


class EventUnverifiable(EventFetchError):
    """A server served the event, but no copy verified (forged, unsigned, altered)."""


class EventInOtherRoom(EventFetchError):
    """The served event is not in a room the caller accepts."""


class EventFetchUnavailable(EventFetchError):
    """A server could not be reached or did not answer in time: try again later."""


class EventFetcher:
    """Fetches and verifies single events from ``servers`` (see the module docstring)."""

    def __init__(
        self,
        client: FederationClient,
        keyring: VerifyKeySource,
        servers: Sequence[str],
        *,
        timeout_seconds: float,
        total_timeout_seconds: float,
        concurrency: int,
        max_response_bytes: int,
        max_pdu_bytes: int,
    ) -> None:
        self._client = client
        self._keyring = keyring
        self.servers = tuple(dict.fromkeys(servers))
        self._timeout = timeout_seconds
        self._total_timeout = total_timeout_seconds
        self._slots = asyncio.Semaphore(concurrency)
        self._max_response_bytes = max_response_bytes
        self._max_pdu_bytes = max_pdu_bytes

    async def fetch(self, event_id: str, room_version_for: RoomVersionFor) -> FetchedEvent:
        """The first verified copy of ``event_id`` from the servers; raises an
        ``EventFetchError`` subclass when there is none."""
        if not self.servers:
            raise EventNotFound("no servers are configured to fetch events from")
        start = time.perf_counter()
        outcomes: dict[str, str] = {}
        tasks = [
            asyncio.create_task(
                self._from(server, event_id, room_version_for, outcomes), name="event-fetch"
            )
            for server in self.servers
        ]
        try:
            async with asyncio.timeout(self._total_timeout):
                for next_done in asyncio.as_completed(tasks):
                    fetched = await next_done
                    if fetched is not None:
                        EVENT_FETCHES.labels("verified").inc()
                        return fetched
        except TimeoutError:
            for server in self.servers:
                if server not in outcomes:
                    outcomes[server] = "timeout"
                    EVENT_FETCH_ANSWERS.labels("timeout").inc()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            EVENT_FETCH_SECONDS.observe(time.perf_counter() - start)
        raise self._failure(event_id, outcomes)

    @staticmethod
    def _failure(event_id: str, outcomes: dict[str, str]) -> EventFetchError:
        seen = set(outcomes.values())
        summary = ", ".join(f"{server}: {outcome}" for server, outcome in outcomes.items())
        logger.info("event fetch failed", extra={"event_id": event_id, "outcomes": summary})
        error: EventFetchError
        if seen & _TRANSIENT:
            EVENT_FETCHES.labels("unavailable").inc()
            error = EventFetchUnavailable(f"not every server answered ({summary})")
        elif seen & _UNVERIFIED:
            EVENT_FETCHES.labels("unverifiable").inc()
            error = EventUnverifiable(f"no served copy of the event verified ({summary})")
        elif "other_room" in seen:
            EVENT_FETCHES.labels("other_room").inc()
            error = EventInOtherRoom("the event is not in a room of the caller's community")
        else:
            EVENT_FETCHES.labels("not_found").inc()
            error = EventNotFound(f"no server has the event ({summary})")
        return error

    async def _from(
        self,
        server: str,
        event_id: str,
        room_version_for: RoomVersionFor,
        outcomes: dict[str, str],
    ) -> FetchedEvent | None:
        """One server's verified copy, or None (its outcome recorded either way)."""
        path = EVENT_PATH + urllib.parse.quote(event_id, safe="")
        async with self._slots:
            try:
                answer = await self._client.get_json(
                    server,
                    path,
                    timeout=self._timeout,
                    max_response_size=self._max_response_bytes,
                )
            except ResponseTooLarge:
                self._record(outcomes, server, "too_large")
                return None
            except HttpResponseError as exc:
                if isinstance(exc, TemporaryFederationError):
                    self._record(outcomes, server, "unavailable")
                    return None
                self._record(outcomes, server, "not_found")  # 4xx: not given to us
                return None
            except TemporaryFederationError:
                self._record(outcomes, server, "unavailable")
                return None
            except FederationError as exc:
                # TLS, the network guard, a garbled answer: the server is of no use now.
                logger.info("event fetch: server failed", extra={"error": str(exc)})
                self._record(outcomes, server, "error")
                return None
        try:
            fetched, outcome = await self._verify(server, event_id, answer, room_version_for)
        except EventSignatureError:
            self._record(outcomes, server, "bad_signature")
            return None
        self._record(outcomes, server, outcome)
        return fetched

    @staticmethod
    def _record(outcomes: dict[str, str], server: str, outcome: str) -> None:
        outcomes[server] = outcome
        EVENT_FETCH_ANSWERS.labels(outcome).inc()

    async def _verify(
        self,
        server: str,
        event_id: str,
        answer: dict[str, Any],
        room_version_for: RoomVersionFor,
    ) -> tuple[FetchedEvent | None, str]:
        pdus = answer.get("pdus")
        if not (isinstance(pdus, list) and len(pdus) == 1 and isinstance(pdus[0], dict)):
            return None, "bad_event"
        pdu: dict[str, Any] = pdus[0]
        try:
            canonical = encode_canonical_json(pdu)
        except ValueError:
            return None, "bad_event"
        if len(canonical) > self._max_pdu_bytes:
            return None, "too_large"
        room_id = pdu.get("room_id")
        if room_id is None and pdu.get("type") == "m.room.create":
            try:  # room version 12 create events carry no room_id: it is their hash
                room_id = room_id_from_create_event(pdu)
            except (ValueError, MatrixError):
                return None, "bad_event"
        if not isinstance(room_id, str) or len(room_id.encode("utf-8")) > MAX_ID_LENGTH:
            return None, "bad_event"  # checked before it becomes a room lookup
        version_id = await room_version_for(room_id)
        if version_id is None:
            return None, "other_room"
        room_version = get_room_version(version_id)
        try:
            validate_pdu(room_version, pdu)
        except MatrixError:
            return None, "bad_event"
        if not check_content_hash(pdu):
            return None, "bad_hash"
        try:
            signing_bytes = redacted_signing_bytes(room_version, pdu)
        except ValueError:
            return None, "bad_event"
        reference_hash = hashlib.sha256(signing_bytes).digest()
        if room_version.event_id_in_json:
            actual_id = str(pdu["event_id"])
        else:
            actual_id = event_id_from_reference_hash(room_version, reference_hash)
        if actual_id != event_id:
            return None, "wrong_id"
        await verify_signatures(self._keyring, room_version, pdu)
        sender = str(pdu["sender"])  # validate_pdu checked "@localpart:server"
        fetched = FetchedEvent(
            event_id=event_id,
            room_id=room_id,
            room_version=version_id,
            pdu=pdu,
            canonical=canonical,
            reference_hash=encode_base64(reference_hash),
            sender_signed=sender.partition(":")[2] in servers_required_to_sign(room_version, pdu),
            served_by=server,
        )
        return fetched, "verified"

"""Verifying a room state snapshot before it seeds learned state (a send_join answer).

A resident server's ``send_join`` answer carries the room's ``state`` and its
``auth_chain``. Warden keeps nothing of it that it has not checked:

* the room's ``m.room.create`` must be in the state, verify, name the room version
  Warden joined with, and belong to the room: from version 12 the room ID is its
  reference hash; before, its sender is on the room ID's server (the create auth rule).
  Else nothing of the snapshot is kept (``SnapshotRejected``): a server answering for a
  room it did not create cannot make up the room's state;
* every event must be a well-formed PDU of the room, with a matching content hash and
  valid signatures of every server required to sign it (keys from the keyring, valid at
  the event's ``origin_server_ts`` from room version 5). Member events are checked too,
  unless the answering server is one of ``PS_TRUSTED_ORIGINS``, whose answers the
  periodic refresh takes on their word as well (a large room has thousands of member
  servers);
* when the answer carries an auth chain, every kept state event's ``auth_events`` must
  be events of the chain or the state that verified themselves: a state event that
  rests on something Warden could not check is left out.

Events that fail are left out and counted; the refresh later fills what is missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import Counter

from warden.federation.keyring_errors import KeyringError
from warden.federation.xmatrix import VerifyKeySource
from warden.matrix.errors import MatrixError
from warden.matrix.event_hashes import (
    check_content_hash,
    compute_event_id,
    room_id_from_create_event,
)
from warden.matrix.event_signing import (
    EventSignatureError,
    EventVerifyKey,
    servers_required_to_sign,
    verify_sender_signature,
)
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.pdu import validate_pdu
from warden.matrix.room_versions import RoomVersion

logger = logging.getLogger(__name__)

SNAPSHOT_EVENTS = Counter(
    "warden_snapshot_events_total",
    "Events of send_join state snapshots, by outcome (kept, bad_event, bad_hash, "
    "bad_signature, unauthenticated: an auth event missing or not verified).",
    ["outcome"],
)

MAX_KEYS_PER_SIGNING_SERVER = 8
# Signature checks of one snapshot running at once (each may fetch a server's keys).
VERIFY_CONCURRENCY = 16


class SnapshotRejected(Exception):
    """The snapshot cannot seed learned state at all (no valid create event, or one
    naming another room version)."""


async def verify_signatures(
    keyring: VerifyKeySource, room_version: RoomVersion, pdu: Mapping[str, Any]
) -> None:
    """Check the signatures of every server required to sign ``pdu``; raises
    ``EventSignatureError``."""
    required = servers_required_to_sign(room_version, pdu)
    ts = pdu.get("origin_server_ts")
    at_ms = ts if room_version.enforce_key_validity and isinstance(ts, int) else 0
    signatures = pdu.get("signatures")
    if not isinstance(signatures, Mapping):
        raise EventSignatureError("event has no 'signatures' object")
    verify_keys: dict[str, dict[str, EventVerifyKey]] = {}
    for server in required:
        by_server = signatures.get(server)
        if not isinstance(by_server, Mapping):
            raise EventSignatureError(f"event is not signed by {server}")
        key_ids = [k for k in by_server if isinstance(k, str) and k.startswith("ed25519:")]
        if len(key_ids) > MAX_KEYS_PER_SIGNING_SERVER:
            raise EventSignatureError(f"too many signatures by {server}")
        found: dict[str, EventVerifyKey] = {}
        for key_id in key_ids:
            try:
                found[key_id] = await keyring.get_verify_key(
                    ServerName(server), KeyID(key_id), at_ms=at_ms
                )
            except KeyringError:
                continue
        verify_keys[server] = found
    verify_sender_signature(room_version, pdu, verify_keys, servers=required)


def _auth_event_ids(room_version: RoomVersion, pdu: Mapping[str, Any]) -> list[str] | None:
    refs = pdu.get("auth_events")
    if not isinstance(refs, list):
        return None
    ids: list[str] = []
    for ref in refs:
        if room_version.event_id_in_json:
            # v1/v2: [event_id, {"sha256": ...}]
            if not (isinstance(ref, list) and ref and isinstance(ref[0], str)):
                return None
            ids.append(ref[0])
        elif isinstance(ref, str):
            ids.append(ref)
        else:
            return None
    return ids


async def verified_state(
    keyring: VerifyKeySource,
    room_version: RoomVersion,
    room_id: str,
    state: Sequence[Mapping[str, Any]],
    auth_chain: Sequence[Mapping[str, Any]] = (),
    *,
    check_member_signatures: bool = True,
) -> list[dict[str, Any]]:
    """The events of ``state`` that verify (see the module doc), in their order.

    Raises ``SnapshotRejected`` when the state has no verified ``m.room.create`` of
    ``room_version``.
    """
    limit = asyncio.Semaphore(VERIFY_CONCURRENCY)

    async def check(pdu: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | str:
        """(event ID, event) when it verifies, else the outcome naming why not."""
        try:
            event = validate_pdu(room_version, pdu)
            if event.get("room_id", room_id) != room_id:
                return "bad_event"
            event_id = str(compute_event_id(room_version, event))
        except (MatrixError, ValueError, TypeError):
            return "bad_event"
        if not check_content_hash(event):
            return "bad_hash"
        if event.get("type") != "m.room.member" or check_member_signatures:
            async with limit:
                try:
                    await verify_signatures(keyring, room_version, event)
                except EventSignatureError:
                    return "bad_signature"
        return event_id, event

    async def check_all(
        events: Iterable[Mapping[str, Any]],
    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        results = await asyncio.gather(*(check(e) for e in events if isinstance(e, Mapping)))
        good: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        for result in results:
            if isinstance(result, str):
                SNAPSHOT_EVENTS.labels(result).inc()
                continue
            good[result[0]] = result[1]
            order.append(result[0])
        return good, order

    verified_chain, _ = await check_all(auth_chain)
    verified, order = await check_all(state)
    known = {**verified_chain, **verified}
    creates = [
        e
        for e in verified.values()
        if e.get("type") == "m.room.create" and e.get("state_key") == ""
    ]
    if len(creates) != 1:
        raise SnapshotRejected("the state has no verified m.room.create event")
    content = creates[0].get("content")
    declared = content.get("room_version", "1") if isinstance(content, Mapping) else None
    if declared != room_version.identifier:
        raise SnapshotRejected(
            f"the create event names room version {declared!r}, not {room_version.identifier!r}"
        )
    if room_version.room_ids_as_hashes:
        if room_id_from_create_event(creates[0], room_version) != room_id:
            raise SnapshotRejected("the create event is not the one the room ID names")
    else:
        sender = creates[0].get("sender")
        creator_server = sender.partition(":")[2] if isinstance(sender, str) else ""
        if not creator_server or creator_server != room_id.partition(":")[2]:
            raise SnapshotRejected("the create event's sender is not on the room ID's server")
    kept: list[dict[str, Any]] = []
    for event_id in order:
        event = verified[event_id]
        if auth_chain and event.get("type") != "m.room.create":
            needed = _auth_event_ids(room_version, event)
            if needed is None or any(a not in known for a in needed):
                SNAPSHOT_EVENTS.labels("unauthenticated").inc()
                continue
        SNAPSHOT_EVENTS.labels("kept").inc()
        kept.append(event)
    dropped = len(state) - len(kept)
    if dropped:
        logger.warning(
            "send_join state: events that did not verify were left out",
            extra={"room_id": room_id, "dropped": dropped, "kept": len(kept)},
        )
    return kept

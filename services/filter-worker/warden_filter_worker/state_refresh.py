"""The periodic room state refresh: correcting what the learned state got wrong.

State learned from ``/send`` drifts: no state resolution, missed transactions, events
that arrive out of order. Every ``PS_STATE_CACHE_INTERVAL_MINUTES`` one filter worker
asks, for each protected room Warden has not been removed from,
``GET /_matrix/federation/v1/state/{roomId}?event_id=<the room's latest seen event>``
of the servers in ``PS_TRUSTED_ORIGINS`` in order, and replaces the room's learned state
with the first answer (``room_state.replace_state``). The answer is verified like a
send_join answer (``warden.federation.snapshot``): it must hold a valid create event
of the room's version (else the next origin is asked); every event's content hash must
match and events other than ``m.room.member`` must carry valid signatures of the
servers required to sign them (invalid ones are left out), and with the answer's auth
chain every kept event's auth events must be known and verified. Members are taken on
the trusted origin's word, since checking thousands of member events' keys would make
a refresh of a large room fetch keys from every server in it.

The refresh is what repairs learned state: ``replace_state`` drops everything the room
held (state events, memberships, display names) and keeps only the snapshot. Its anchor
is the latest event learned from ``/send``, which passed signature and auth checks; but
an in-room server can still send Warden an event it never sent to the room, which no
trusted server knows. When no origin answers for that anchor, the refresh asks again
at the anchor of the last verified snapshot (``trusted_event_id``: the join event or
the previous refresh's anchor), so a made-up event cannot stop repairs.

One worker at a time, and one refresh per interval across all of them: a worker takes
the Redis lock ``state_refresh_lock`` (SET NX with a TTL of one interval), renews it
while it works, and leaves it to expire one interval after it finished. Others find
the lock taken and look again later. A worker that dies mid-refresh holds the lock at
most one interval. policyserv runs its job in every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from prometheus_client import Counter

from warden import redis_keys
from warden.federation.client import FederationClient
from warden.federation.errors import FederationError
from warden.federation.snapshot import SnapshotRejected, verified_state, verify_signatures
from warden.federation.xmatrix import VerifyKeySource
from warden.matrix.event_hashes import check_content_hash, compute_event_id
from warden.matrix.event_signing import EventSignatureError
from warden.matrix.room_versions import get_room_version
from warden.storage.room_state import (
    DEFAULT_CAPS,
    MEMBER,
    RefreshTarget,
    StateCaps,
    replace_state,
    rooms_to_refresh,
)
from warden_filter_worker.room_state_consumer import ROOM_STATE_UPDATES

logger = logging.getLogger(__name__)

STATE_REFRESHES = Counter(
    "warden_state_refreshes_total",
    "Rooms whose state the periodic refresh fetched, by outcome (ok, failed).",
    ["outcome"],
)

# The lock is renewed to at least this much while a refresh runs.
LOCK_LEASE_SECONDS = 120.0
# How often a worker without the lock looks whether a refresh is due.
MAX_POLL_SECONDS = 60.0

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_jitter = random.SystemRandom()


class StateRefresher:
    """Runs the refresh loop of one worker."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        client: FederationClient,
        keyring: VerifyKeySource,
        trusted_origins: Sequence[str],
        interval_seconds: float,
        local_user_id: str,
        caps: StateCaps = DEFAULT_CAPS,
    ) -> None:
        self._caps = caps
        self._pool = pool
        self._redis = redis
        self._client = client
        self._keyring = keyring
        self._origins = [o for o in trusted_origins if o]
        self._interval = interval_seconds
        self._local_user_id = local_user_id
        self._renew = redis.register_script(_RENEW)
        self.runs = 0  # refreshes this worker did (tests, logs)

    async def run(self, stopping: asyncio.Event) -> None:
        """Refresh whenever the lock can be had, until ``stopping`` is set."""
        poll = min(self._interval, MAX_POLL_SECONDS)
        # A little jitter so that workers started together do not all race at once.
        delay = _jitter.uniform(0, min(poll, 5.0) / 5)
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return
            try:
                await self.refresh_if_due()
            except Exception:  # Redis or PostgreSQL hiccup: try again later
                logger.exception("state refresh failed", extra={"event": "state_refresh_failed"})
            delay = poll * _jitter.uniform(0.9, 1.1)

    async def refresh_if_due(self) -> bool:
        """Take the lock and refresh every room; False when another worker holds it."""
        key = redis_keys.state_refresh_lock()
        token = secrets.token_hex(8)
        lease_ms = int(max(self._interval, LOCK_LEASE_SECONDS) * 1000)
        if not await self._redis.set(key, token, nx=True, px=lease_ms):
            return False
        started = time.monotonic()
        ok = failed = 0
        try:
            for target in await rooms_to_refresh(self._pool):
                await self._renew(keys=[key], args=[token, lease_ms])
                if await self.refresh_room(target):
                    ok += 1
                else:
                    failed += 1
        finally:
            # Held for one more interval from now: the next refresh is due then.
            await self._renew(keys=[key], args=[token, int(self._interval * 1000)])
        self.runs += 1
        logger.info(
            "room state refreshed",
            extra={
                "event": "state_refresh",
                "rooms": ok,
                "failed": failed,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return True

    async def refresh_room(self, target: RefreshTarget) -> bool:
        """Replace one room's state with the first trusted origin's answer (at the
        latest learned event, else at the last verified snapshot's anchor)."""
        anchors = [target.last_event_id]
        if target.trusted_event_id and target.trusted_event_id != target.last_event_id:
            anchors.append(target.trusted_event_id)
        for anchor in anchors:
            if await self._refresh_at(target, anchor):
                STATE_REFRESHES.labels("ok").inc()
                ROOM_STATE_UPDATES.labels("refresh").inc()
                return True
        STATE_REFRESHES.labels("failed").inc()
        return False

    async def _refresh_at(self, target: RefreshTarget, anchor: str) -> bool:
        path = "/_matrix/federation/v1/state/" + urllib.parse.quote(target.room_id, safe="")
        for origin in self._origins:
            try:
                answer = await self._client.get_json(origin, path, query={"event_id": anchor})
            except FederationError as exc:
                logger.info(
                    "state refresh: origin did not answer",
                    extra={"room_id": target.room_id, "origin": origin, "error": str(exc)},
                )
                continue
            pdus = answer.get("pdus")
            if not isinstance(pdus, list):
                continue
            chain = answer.get("auth_chain")
            chain_events = (
                [c for c in chain if isinstance(c, dict)] if isinstance(chain, list) else []
            )
            try:
                events: list[Mapping[str, Any]] = list(
                    await verified_state(
                        self._keyring,
                        get_room_version(target.room_version),
                        target.room_id,
                        [p for p in pdus if isinstance(p, dict)],
                        chain_events,
                        check_member_signatures=False,
                    )
                )
            except SnapshotRejected as exc:
                logger.warning(
                    "state refresh: snapshot refused",
                    extra={"room_id": target.room_id, "origin": origin, "error": str(exc)},
                )
                continue
            # /state answers the state *before* the anchor event: when the anchor is
            # itself a state event (a new rule, power levels, m.room.policy), it must be
            # applied on top, or every refresh would undo the room's latest change.
            events.extend(await self._anchor_if_state(origin, target, anchor))
            await replace_state(
                self._pool,
                target.room_id,
                target.room_version,
                events,
                our_user_id=self._local_user_id,
                event_id=anchor,
                caps=self._caps,
            )
            return True
        return False

    async def _anchor_if_state(
        self, origin: str, target: RefreshTarget, anchor: str
    ) -> list[Mapping[str, Any]]:
        """The anchor event, verified, when it is a state event; else nothing."""
        path = "/_matrix/federation/v1/event/" + urllib.parse.quote(anchor, safe="")
        try:
            answer = await self._client.get_json(origin, path)
        except FederationError as exc:
            logger.info(
                "state refresh: anchor event not fetched",
                extra={"room_id": target.room_id, "origin": origin, "error": str(exc)},
            )
            return []
        pdus = answer.get("pdus")
        if not (isinstance(pdus, list) and pdus and isinstance(pdus[0], dict)):
            return []
        pdu = pdus[0]
        if "state_key" not in pdu:
            return []
        try:
            same = compute_event_id(get_room_version(target.room_version), pdu)
        except ValueError:
            return []
        if same != anchor:  # the origin sent another event: ignore it
            return []
        return await self._verified(target, [pdu])

    async def _verified(
        self, target: RefreshTarget, pdus: list[dict[str, Any]]
    ) -> list[Mapping[str, Any]]:
        version = get_room_version(target.room_version)
        kept: list[Mapping[str, Any]] = []
        for pdu in pdus:
            if not check_content_hash(pdu):
                # Signatures cover the redacted event only: the hash binds the content.
                logger.warning(
                    "state refresh: event with a bad content hash left out",
                    extra={"room_id": target.room_id},
                )
                continue
            if pdu.get("type") != MEMBER:
                try:
                    await verify_signatures(self._keyring, version, pdu)
                except EventSignatureError as exc:
                    logger.warning(
                        "state refresh: event with a bad signature left out",
                        extra={"room_id": target.room_id, "error": str(exc)},
                    )
                    continue
            kept.append(pdu)
        return kept

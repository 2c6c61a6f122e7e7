"""Joining and leaving rooms, and what follows: protecting them and seeding their state.

``RoomJoiner`` is used by the admin API (``POST /rooms/{roomId}/join`` and ``/leave``),
by accepted invites (a background join through the inviting server, retried) and by
``StartupJoins`` (``PS_JOIN_ROOM_IDS``, one gateway replica at a time).

A join, whatever asked for it:

1. make_join / send_join through each candidate server in turn
   (``warden.federation.membership``);
2. the room is protected for the community (``rooms``), moved there if it was protected
   for another one (rejoining after a kick works: a known room is joined again, never
   refused as policyserv does). The room version of a known room never changes: a
   server whose ``make_join`` names another version is refused (and logged) before
   anything is sent to it;
3. the send_join ``state`` (plus our join event) seeds the learned room state once it
   verified (``warden.federation.snapshot``: content hashes, signatures, the auth
   chain); events that do not are left out, and a snapshot without a valid create
   event of the room's version seeds nothing but our own membership;
4. the membership is recorded (``room_memberships``) with the server that answered, the
   first to ask when leaving;
5. ``{"room_id"}`` is announced on ``CONFIG_CHANGED_SUBJECT`` so every gateway drops its
   cached room record.

A leave does make_leave / send_leave, stops protecting the room, withdraws any invite
approval, and announces the change the same way.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from warden import redis_keys
from warden.bus.subjects import CONFIG_CHANGED_SUBJECT
from warden.federation.membership import (
    JoinResult,
    LeaveResult,
    MembershipClient,
    MembershipFailed,
    candidate_servers,
)
from warden.federation.snapshot import SnapshotRejected, verified_state
from warden.federation.xmatrix import VerifyKeySource
from warden.matrix.room_versions import get_room_version
from warden.settings import Settings
from warden.storage import membership as membership_store
from warden.storage import room_state, rooms
from warden.storage.database import DATABASE_ERRORS
from warden.storage.records import Room
from warden.telemetry.tracing import inject_headers

logger = logging.getLogger(__name__)

_DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, RedisError)

JOINS = Counter(
    "warden_federation_joins_total",
    "Joins and leaves of rooms over federation, by outcome: joined, left, failed "
    "(no server completed it), unsupported_version, version_mismatch (a server named "
    "another version than a known room's).",
    ["outcome"],
)
BACKGROUND_JOINS = Counter(
    "warden_background_joins_total",
    "Background joins after accepted invites, by outcome: started, already_pending (one "
    "per room at a time), refused (PS_INVITE_JOIN_MAX_PENDING reached).",
    ["outcome"],
)
BACKGROUND_JOINS_PENDING = Gauge(
    "warden_background_joins_pending",
    "Background joins after accepted invites running or waiting to retry.",
)

# How long the start-up joiner's Redis lock lives without a refresh, and how often the
# holder refreshes it. A replica that dies holding it is replaced after at most the TTL.
LOCK_TTL_SECONDS = 60
LOCK_REFRESH_SECONDS = 20
# How often a replica without the lock checks whether the holder finished or died.
LOCK_POLL_SECONDS = 5.0
MAX_RETRY_SECONDS = 300.0
# Joins after an accepted invite: the inviting server answers /invite before it has
# finished sending the invite into the room, so the first try waits a little.
INVITE_JOIN_FIRST_DELAY_SECONDS = 1.0
INVITE_JOIN_ATTEMPTS = 6

_COMPARE_AND_EXPIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def backoff_seconds(base: float, attempt: int) -> float:
    """``base`` * 2^(attempt - 1), capped at five minutes, +-20 % jitter."""
    delay = min(base * (2 ** max(0, attempt - 1)), MAX_RETRY_SECONDS)
    return float(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not secrecy


class TooManyPendingJoins(Exception):
    """``PS_INVITE_JOIN_MAX_PENDING`` background joins are already running."""


class NotificationFailed(Exception):
    """The change is saved but could not be announced on NATS."""


@dataclass(frozen=True)
class JoinOutcome:
    """A completed join and the room record it produced."""

    result: JoinResult
    room: Room


class RoomJoiner:
    """Joins and leaves rooms for the gateway, and records the outcome."""

    def __init__(
        self,
        *,
        settings: Settings,
        client: MembershipClient,
        pool: asyncpg.Pool,
        nats: NATS,
        keyring: VerifyKeySource,
        notify_timeout_seconds: int = 5,
    ) -> None:
        self._settings = settings
        self._keyring = keyring
        self._caps = room_state.StateCaps.from_settings(settings)
        self._pending: dict[str, asyncio.Task[None]] = {}
        self.client = client
        self._pool = pool
        self._nats = nats
        self._notify_timeout = notify_timeout_seconds
        # One join or leave of a room at a time in this process. Weak values: a lock
        # lives while someone holds or waits for it, so the map does not grow.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pool(self) -> asyncpg.Pool:
        """The database the joiner records rooms and memberships in."""
        return self._pool

    def _lock(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    def join_servers(self, room_id: str, via: Sequence[str] | None) -> list[str]:
        """Candidates for joining: ``via`` (default ``PS_JOIN_SERVER``), then the room
        ID's server part."""
        chosen = list(via) if via else [self._settings.join_server]
        return candidate_servers(room_id, chosen, exclude=self._settings.homeserver_name)

    async def join(
        self, room_id: str, community_id: str, via: Sequence[str] | None = None
    ) -> JoinOutcome:
        """Join ``room_id`` and protect it for ``community_id`` (moving it if needed).

        Raises ``MembershipFailed`` when no server completed the join, and
        ``NotificationFailed`` when the join is recorded but gateways were not told.
        """
        servers = self.join_servers(room_id, via)
        async with self._lock(room_id):
            known = await rooms.get_room(self._pool, room_id)
            recorded = known.room_version if known is not None else None
            try:
                result = await self.client.join(room_id, servers, room_version=recorded)
            except MembershipFailed as exc:
                outcome = (
                    "unsupported_version"
                    if exc.unsupported_version
                    else "version_mismatch"
                    if exc.version_mismatch
                    else "failed"
                )
                JOINS.labels(outcome).inc()
                logger.warning("join failed", extra={"room_id": room_id, "reasons": exc.reasons})
                raise
            room = await rooms.put_room(
                self._pool, room_id, recorded or result.room_version, community_id
            )
            await self._seed_state(result)
            # The server that answered first, then the other candidates.
            remembered = [result.server, *(s for s in servers if s != result.server)]
            await membership_store.record_membership(
                self._pool,
                room_id,
                "join",
                room_version=room.room_version,
                event_id=result.event_id,
                servers=remembered,
            )
        JOINS.labels("joined").inc()
        logger.info(
            "room protected after join",
            extra={"room_id": room_id, "community_id": community_id, "server": result.server},
        )
        await self._notify(room_id)
        return JoinOutcome(result, room)

    async def leave(self, room_id: str, via: Sequence[str] | None = None) -> LeaveResult:
        """Leave ``room_id`` and stop protecting it.

        The servers asked are ``via``, then those remembered from the join, then
        ``PS_JOIN_SERVER`` and the room ID's server part. Raises ``MembershipFailed``
        (nothing changed locally) or ``NotificationFailed`` (left and unprotected, but
        gateways were not told).
        """
        async with self._lock(room_id):
            known = await membership_store.get_membership(self._pool, room_id)
            remembered = list(known.servers) if known else []
            servers = candidate_servers(
                room_id,
                [*(via or []), *remembered],
                fallback=[self._settings.join_server],
                exclude=self._settings.homeserver_name,
            )
            try:
                result = await self.client.leave(room_id, servers)
            except MembershipFailed as exc:
                JOINS.labels("failed").inc()
                logger.warning("leave failed", extra={"room_id": room_id, "reasons": exc.reasons})
                raise
            await rooms.delete_room(self._pool, room_id)
            await membership_store.withdraw_invite_approval(self._pool, room_id)
            await membership_store.record_membership(
                self._pool,
                room_id,
                "leave",
                room_version=result.room_version,
                event_id=result.event_id,
                servers=[result.server, *(s for s in servers if s != result.server)],
            )
            JOINS.labels("left").inc()
        await self._notify(room_id)
        return result

    async def _seed_state(self, result: JoinResult) -> None:
        """Seed the learned state from the verified send_join answer (and our own join
        event).

        A failure here does not undo the join: the room is protected either way, our
        join event becomes the refresh's anchor, and the periodic refresh fills what is
        missing (``/send`` learns nothing until members are known).
        """
        version = get_room_version(result.room_version)
        trusted = result.server in self._settings.trusted_origins
        try:
            state = await verified_state(
                self._keyring,
                version,
                result.room_id,
                result.state,
                result.auth_chain,
                check_member_signatures=not trusted,
            )
        except SnapshotRejected as exc:
            logger.error(
                "send_join state refused; only our membership is recorded",
                extra={"room_id": result.room_id, "server": result.server, "error": str(exc)},
            )
            state = []
        try:
            await room_state.seed_from_state(
                self._pool,
                result.room_id,
                result.room_version,
                [*state, result.event],
                our_user_id=self.client.user_id,
                event_id=result.event_id,
                caps=self._caps,
            )
        except Exception:
            logger.exception(
                "could not seed the room's state from the join", extra={"room_id": result.room_id}
            )

    async def _notify(self, room_id: str) -> None:
        try:
            await self._nats.publish(
                CONFIG_CHANGED_SUBJECT,
                orjson.dumps({"room_id": room_id}),
                headers=inject_headers() or None,
            )
            await self._nats.flush(timeout=self._notify_timeout)
        except (NatsError, TimeoutError) as exc:
            logger.warning(
                "room change saved but not announced",
                extra={"room_id": room_id, "error": repr(exc)},
            )
            raise NotificationFailed(str(exc)) from exc

    # --- background joins ---

    def join_in_background(
        self,
        room_id: str,
        community_id: str,
        via: Sequence[str],
        *,
        attempts: int = INVITE_JOIN_ATTEMPTS,
        first_delay: float = INVITE_JOIN_FIRST_DELAY_SECONDS,
    ) -> asyncio.Task[None]:
        """Join soon, retrying with backoff (after an accepted invite).

        One background join per room at a time (a second invite gets the running
        task), and at most ``PS_INVITE_JOIN_MAX_PENDING`` in all: beyond that raises
        ``TooManyPendingJoins`` (check ``can_join_in_background`` first).
        """
        running = self._pending.get(room_id)
        if running is not None and not running.done():
            BACKGROUND_JOINS.labels("already_pending").inc()
            return running
        if not self.can_join_in_background(room_id):
            BACKGROUND_JOINS.labels("refused").inc()
            raise TooManyPendingJoins(room_id)

        async def run() -> None:
            await asyncio.sleep(first_delay)
            for attempt in range(1, attempts + 1):
                try:
                    await self.join(room_id, community_id, via)
                    return
                except NotificationFailed:
                    return  # joined; the room record expires from caches on its own
                except MembershipFailed as exc:
                    if exc.unsupported_version or exc.version_mismatch or attempt == attempts:
                        logger.error(
                            "giving up joining after an invite",
                            extra={"room_id": room_id, "reasons": exc.reasons},
                        )
                        return
                except Exception:  # a dependency or a bug: logged, retried
                    logger.exception("join after invite failed locally", extra={"room_id": room_id})
                await asyncio.sleep(
                    backoff_seconds(self._settings.join_retry_base_seconds, attempt)
                )

        task = asyncio.create_task(run(), name=f"join-{room_id}")
        BACKGROUND_JOINS.labels("started").inc()
        self._tasks.add(task)
        self._pending[room_id] = task
        BACKGROUND_JOINS_PENDING.set(len(self._pending))

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if self._pending.get(room_id) is finished:
                del self._pending[room_id]
            BACKGROUND_JOINS_PENDING.set(len(self._pending))

        task.add_done_callback(done)
        return task

    def can_join_in_background(self, room_id: str) -> bool:
        """Whether ``join_in_background`` would take this room now (already pending
        for it, or below ``PS_INVITE_JOIN_MAX_PENDING``)."""
        running = self._pending.get(room_id)
        if running is not None and not running.done():
            return True
        return len(self._pending) < self._settings.invite_join_max_pending

    async def aclose(self) -> None:
        """Cancel background joins (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisLock:
    """A lock shared by every replica: SET NX with a TTL, refreshed by its holder."""

    def __init__(self, redis: aioredis.Redis, key: str, ttl_seconds: int) -> None:
        self._redis = redis
        self._key = key
        self._ttl = ttl_seconds
        self._token = secrets.token_hex(16)

    async def acquire(self) -> bool:
        """Take the lock if nobody holds it."""
        return bool(await self._redis.set(self._key, self._token, nx=True, ex=self._ttl))

    async def refresh(self) -> bool:
        """Extend our hold; False if the lock is no longer ours."""
        done = await self._redis.eval(_COMPARE_AND_EXPIRE, 1, self._key, self._token, self._ttl)
        return bool(done)

    async def release(self) -> None:
        """Let go, if the lock is still ours."""
        await self._redis.eval(_COMPARE_AND_DELETE, 1, self._key, self._token)


class StartupJoins:
    """Joins ``PS_JOIN_ROOM_IDS`` into the ``default`` community at start.

    One replica at a time does it, holding ``redis_keys.startup_join_lock()``; the others
    poll until every room is joined (and take over if the holder dies). Rooms already
    recorded as joined are skipped, so restarts do not rejoin. Failures are logged and
    retried with backoff (``PS_JOIN_RETRY_BASE_SECONDS`` doubling to five minutes),
    never fatal.
    """

    def __init__(
        self,
        joiner: RoomJoiner,
        redis: aioredis.Redis,
        settings: Settings,
        *,
        start_delay_seconds: float = 1.0,
        lock_poll_seconds: float = LOCK_POLL_SECONDS,
    ) -> None:
        self._joiner = joiner
        self._redis = redis
        self._settings = settings
        self._room_ids = list(dict.fromkeys(settings.join_room_ids))
        self._start_delay = start_delay_seconds
        self._lock_poll = lock_poll_seconds

    async def run(self) -> None:
        """Background task: returns once every room is joined."""
        if not self._room_ids:
            return
        # Let the HTTP server come up first: the resident server fetches our key to
        # check the join.
        await asyncio.sleep(self._start_delay)
        lock = RedisLock(self._redis, redis_keys.startup_join_lock(), LOCK_TTL_SECONDS)
        waiting_logged = False
        while True:
            try:
                pending = await self._pending()
                if not pending:
                    logger.info("start-up rooms joined", extra={"rooms": len(self._room_ids)})
                    return
                if await lock.acquire():
                    try:
                        # Again under the lock: the last holder may have just finished.
                        pending = await self._pending()
                        if pending:
                            logger.info("joining start-up rooms", extra={"rooms": pending})
                            await self._join_all(lock, pending)
                    finally:
                        await lock.release()
                    continue
            except _DEPENDENCY_ERRORS as exc:
                logger.warning("start-up joins: dependency error", extra={"error": repr(exc)})
            except Exception:
                # Never fatal: a failure here must not stop the gateway serving /sign.
                logger.exception("start-up joins failed; retrying")
            if not waiting_logged:
                logger.info("another replica holds the start-up join lock; waiting")
                waiting_logged = True
            await asyncio.sleep(self._lock_poll)

    async def _pending(self) -> list[str]:
        joined = await membership_store.joined_rooms(self._joiner.pool, self._room_ids)
        return [r for r in self._room_ids if r not in joined]

    async def _join_all(self, lock: RedisLock, pending: list[str]) -> None:
        loop = asyncio.get_running_loop()
        attempts = dict.fromkeys(pending, 0)
        next_try = dict.fromkeys(pending, 0.0)
        last_refresh = loop.time()
        while attempts:
            now = loop.time()
            if now - last_refresh >= LOCK_REFRESH_SECONDS:
                if not await lock.refresh():
                    logger.warning("lost the start-up join lock")
                    return
                last_refresh = now
            due = [r for r in attempts if next_try[r] <= now]
            for room_id in due:
                attempts[room_id] += 1
                if await self._try_join(room_id, attempts[room_id]):
                    del attempts[room_id]
                else:
                    next_try[room_id] = loop.time() + backoff_seconds(
                        self._settings.join_retry_base_seconds, attempts[room_id]
                    )
            if attempts:
                wait = min(next_try[r] for r in attempts) - loop.time()
                await asyncio.sleep(max(0.0, min(wait, LOCK_REFRESH_SECONDS)))

    async def _try_join(self, room_id: str, attempt: int) -> bool:
        try:
            await self._joiner.join(room_id, "default")
        except NotificationFailed:
            pass  # joined and recorded; caches expire on their own
        except MembershipFailed as exc:
            logger.warning(
                "start-up join failed; will retry",
                extra={"room_id": room_id, "attempt": attempt, "error": str(exc)},
            )
            return False
        except Exception:  # a bug or a dependency: logged and retried, never fatal
            logger.exception(
                "start-up join failed locally; will retry",
                extra={"room_id": room_id, "attempt": attempt},
            )
            return False
        logger.info("joined start-up room", extra={"room_id": room_id, "attempt": attempt})
        return True

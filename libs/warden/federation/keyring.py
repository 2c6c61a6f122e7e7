"""The keyring: other servers' verify keys, cached in layers and fetched when missing.

Lookup order for ``get_verify_key(server, key_id, at_ms=...)``:

1. our own keys (never fetched);
2. an in-process LRU cache (short TTL, so replicas pick up what others stored);
3. Redis (shared by all replicas; TTL ends at the key's ``valid_until_ts``);
4. PostgreSQL ``server_keys`` (survives a Redis flush; keeps expired keys too);
5. a fetch: directly from the server (``PS_DIRECT_KEY_FETCHING``) and/or through the
   notary (``PS_KEY_QUERY_SERVER``, whose pinned key must sign every response).

A key is usable at time ``t`` when ``t <= valid_until_ts``; for keys the server lists
in ``old_verify_keys`` that is their ``expired_ts``. Validity is capped at seven days
after fetching (spec), so even a long-lived key is refetched weekly.

When a fetch does not produce a usable key (unknown key, expired key, fetch failure),
the (server, key ID) pair is put in a negative cache in Redis: no replica fetches for
that pair again until it lapses. A definitive answer (the key is not published, the
document is invalid) is kept ``PS_KEY_NEGATIVE_CACHE_SECONDS``; a failure that may pass
(timeout, refused connection, 5xx) only ``PS_KEY_NEGATIVE_CACHE_TIMEOUT_SECONDS``. Keyed
by key ID too, so a made-up key ID for a real server, or a notary slowed down on purpose,
cannot keep the server's real key from being fetched for long. Concurrent lookups in one
process share a single fetch per server.

Without Redis (``warden.runtime.redis_outage``: unreachable, then skipped for 1 s before
the next try) keys are read from memory and PostgreSQL, and the negative cache is kept
in process (up to ``LOCAL_NEGATIVE_CACHE_SIZE`` entries, same durations): each replica
then fetches a missing key once per period rather than once for all, but not once per
request. Counted in ``warden_redis_fallbacks_total{use="key_cache"}``.

Fetches are bounded (review H8), because lookups for X-Matrix requests happen before
the request is authenticated and server names cost an attacker nothing:
``PS_KEY_FETCH_CONCURRENCY`` fetches at once per process, and
``PS_KEY_FETCHES_PER_CLIENT_PER_MINUTE`` fetches started per client address (IPv6 per
/64) for the lookups a request makes on a client's behalf (``requester``). A lookup over
its client's budget fails at once without fetching, and once a client's budget is spent
its lookups of keys not in this process's memory fail at once too, without a Redis or
PostgreSQL round trip (keys in memory are found for every client). A lookup that finds
every slot taken waits ``SLOT_WAIT_SECONDS`` at most (a burst of legitimate first
contacts clears in that time; slots held by an attacker's slow names do not), then fails
(``warden_key_fetches_refused_total``). A lookup without a requester (event signatures
checked by a worker) waits for a slot as long as it takes.

The compromised key policyserv excludes (ELEMENTSEC-2025-1670) is dropped from every
fetch: it is the ed25519 key Go's ``ed25519.GenerateKey`` makes from
``math/rand.New(rand.NewSource(0))``. Its public half, below, was derived by running
exactly that with Go 1.19 (seed ``0194fdc2...0b75``); the same program printed the
well-known first ``Int63`` of seed 1 (5577006791947779410), which checks the generator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from unpaddedbase64 import decode_base64

from warden import redis_keys
from warden.federation.errors import FederationError, TemporaryFederationError
from warden.federation.keyring_errors import KeyExpired, KeyNotFound, KeyringError
from warden.federation.server_key_document import (
    FetchedKey,
    InvalidKeyDocument,
    current_time_ms,
    requested_validity_ts,
    verify_server_key_document,
)
from warden.federation.xmatrix import is_valid_server_name
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import VerifyKey, decode_verify_key
from warden.runtime.client_penalties import client_bucket
from warden.runtime.redis_outage import RedisOutage, is_redis_outage
from warden.settings import Settings
from warden.storage.database import DATABASE_ERRORS
from warden.telemetry.metrics import COMPROMISED_KEYS_SEEN, KEY_FETCHES, KEY_FETCHES_REFUSED

__all__ = ["KeyExpired", "KeyFetchClient", "KeyNotFound", "Keyring", "KeyringError"]

logger = logging.getLogger(__name__)

# Public half of the key generated from Go's math/rand seed 0 (see module docstring).
COMPROMISED_KEYS: frozenset[bytes] = frozenset(
    {decode_base64("l/O9hxMVKB6Lg+3Hqf0FQQZhVESQcMzbPN1Cz2nM3og")}
)

# How long a lookup made for a request waits for a free fetch slot.
SLOT_WAIT_SECONDS = 1.0

MEMORY_CACHE_SIZE = 4096
MEMORY_CACHE_TTL_SECONDS = 300.0
# Negative lookups kept in process while Redis is down.
LOCAL_NEGATIVE_CACHE_SIZE = 10_000


class KeyFetchClient(Protocol):
    """The parts of ``FederationClient`` the keyring uses."""

    async def get_json(
        self,
        destination: str,
        path: str,
        *,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - passed through to the client
    ) -> Any:
        """GET a JSON document from another server."""
        ...

    async def post_json(
        self,
        destination: str,
        path: str,
        body: Mapping[str, Any],
        *,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """POST JSON to another server and return its JSON answer."""
        ...


# What one fetch produced: the keys found, the sources' failures, and whether every
# failure was one that may pass (timeouts, refused connections, 5xx).
_FetchResult = tuple[dict[KeyID, FetchedKey], list[str], bool]


class _MemoryCache:
    """A small LRU with a per-entry deadline (monotonic seconds)."""

    def __init__(self, size: int, ttl: float) -> None:
        self._size = size
        self._ttl = ttl
        self._entries: OrderedDict[tuple[str, str], tuple[float, FetchedKey]] = OrderedDict()

    def get(self, server_name: str, key_id: str) -> FetchedKey | None:
        item = self._entries.get((server_name, key_id))
        if item is None:
            return None
        deadline, key = item
        if time.monotonic() > deadline:
            del self._entries[(server_name, key_id)]
            return None
        self._entries.move_to_end((server_name, key_id))
        return key

    def put(self, key: FetchedKey) -> None:
        entry = (key.server_name, key.key_id)
        self._entries[entry] = (time.monotonic() + self._ttl, key)
        self._entries.move_to_end(entry)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


_BUDGET_SPENT = "too many key fetches for this client; retry later"


def _usable(key: FetchedKey, at_ms: int) -> bool:
    return at_ms <= key.valid_until_ts


class FetchBudget:
    """Fetches each client may start within a minute of its first one.

    Each client's minute starts with its first fetch, so a burst is never split across
    two windows. The table is bounded: past ``max_clients`` the oldest entry makes room
    once its minute is over, and until then newcomers are refused, whatever the number
    of addresses an attacker has.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_minute = per_minute
        self._max_clients = max_clients
        self._clock = clock
        self._used: dict[str, tuple[float, int]] = {}  # bucket -> (minute start, count)

    def spent(self, client: str) -> bool:
        """Whether ``client``'s budget for this minute is used up (charges nothing)."""
        entry = self._used.get(client_bucket(client))
        return (
            entry is not None and self._clock() - entry[0] < 60.0 and entry[1] >= self._per_minute
        )

    def take(self, client: str) -> bool:
        """Charge one fetch to ``client``; False when its budget for this minute is spent."""
        now = self._clock()
        bucket = client_bucket(client)
        entry = self._used.get(bucket)
        if entry is not None and now - entry[0] < 60.0:
            if entry[1] >= self._per_minute:
                return False
            self._used[bucket] = (entry[0], entry[1] + 1)
            return True
        if entry is not None:
            del self._used[bucket]  # re-inserted below: the table stays oldest first
        elif len(self._used) >= self._max_clients:
            oldest = next(iter(self._used))
            if now - self._used[oldest][0] < 60.0:
                return False
            del self._used[oldest]
        self._used[bucket] = (now, 1)
        return True


class Keyring:
    """Verify keys of other servers, for X-Matrix requests and event signatures."""

    def __init__(
        self,
        settings: Settings,
        federation_client: KeyFetchClient,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        *,
        our_server_name: str,
        our_keys: Mapping[KeyID, VerifyKey],
        clock: Callable[[], int] = current_time_ms,
        fetch_budget: FetchBudget | None = None,
    ) -> None:
        self._client = federation_client
        self._redis = redis
        self._pool = pool
        self._our_server_name = our_server_name
        self._our_keys = dict(our_keys)
        self._clock = clock
        self._direct = settings.direct_key_fetching
        notary = settings.notary
        self._notary: tuple[ServerName, KeyID, VerifyKey] | None = None
        if notary is not None:
            self._notary = (
                notary.server_name,
                notary.key_id,
                decode_verify_key(notary.key_id, notary.verify_key_base64),
            )
        self._timeout = settings.key_fetch_timeout_seconds
        self._negative_seconds = settings.key_negative_cache_seconds
        self._negative_timeout_seconds = settings.key_negative_cache_timeout_seconds
        self._fetch_slots = asyncio.Semaphore(settings.key_fetch_concurrency)
        # ``fetch_budget`` replaces the one the settings describe (tests fix its clock).
        self._budget = fetch_budget or FetchBudget(settings.key_fetches_per_client_per_minute)
        self._memory = _MemoryCache(MEMORY_CACHE_SIZE, MEMORY_CACHE_TTL_SECONDS)
        self._redis_outage = RedisOutage("key_cache")
        # (server, key ID) -> (monotonic deadline, reason): negative lookups that could
        # not be written to Redis.
        self._local_negative: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_FetchResult]] = {}

    async def get_verify_key(
        self,
        server_name: ServerName,
        key_id: KeyID,
        *,
        at_ms: int | None = None,
        requester: str | None = None,
    ) -> VerifyKey:
        """Return ``server_name``'s key ``key_id`` if it was valid at ``at_ms`` (default now).

        ``requester`` is the address of the client on whose behalf the lookup is made
        (an X-Matrix request not yet authenticated): a fetch it would start is charged to
        its budget, and refused when the budget or the process's fetch slots are spent.

        Raises ``KeyNotFound`` when the key is unknown (or could not be fetched) and
        ``KeyExpired`` when it is known but its validity ended before ``at_ms``.
        """
        at = self._clock() if at_ms is None else at_ms
        if server_name == self._our_server_name:
            ours = self._our_keys.get(key_id)
            if ours is None:
                raise KeyNotFound(f"{key_id} is not one of our own keys")
            return ours
        if not is_valid_server_name(server_name):
            raise KeyNotFound(f"{server_name!r} is not a valid server name")

        stale: FetchedKey | None = None
        cached = self._memory.get(server_name, key_id)
        if cached is not None:
            if _usable(cached, at):
                return cached.verify_key
            stale = cached
        elif requester is not None and self._budget.spent(requester):
            # A client that spent its fetch budget (made-up server names, each a miss)
            # gets no Redis and PostgreSQL round trips either: before authentication,
            # almost nothing. Keys in memory are still found, for every client.
            KEY_FETCHES_REFUSED.labels("client_budget").inc()
            raise KeyNotFound(f"no key {key_id} for {server_name} in memory: {_BUDGET_SPENT}")
        cached = await self._from_redis(server_name, key_id)
        if cached is not None:
            if _usable(cached, at):
                self._memory.put(cached)
                return cached.verify_key
            stale = cached
        cached = await self._from_database(server_name, key_id)
        if cached is not None:
            if _usable(cached, at):
                self._memory.put(cached)
                await self._to_redis([cached])
                return cached.verify_key
            stale = cached
        # An old key that ended before ``at`` will not come back by fetching.
        if stale is not None and stale.expired:
            raise _expired(stale, at)

        negative = await self._negative_reason(server_name, key_id)
        if negative is not None:
            if stale is not None:
                raise _expired(stale, at)
            raise KeyNotFound(f"no key {key_id} for {server_name} (recently looked up: {negative})")

        keys, problems, transient = await self._fetch_shared(server_name, key_id, at, requester)
        found = keys.get(key_id)
        if found is not None and _usable(found, at):
            return found.verify_key
        if found is not None:
            reason = f"{key_id} valid only until {found.valid_until_ts}"
        elif problems:
            reason = "; ".join(problems)
        else:
            reason = f"{key_id} not published"
        # A failure that may pass (timeout, refused connection) is retried sooner.
        ttl = self._negative_seconds
        if transient and found is None:
            ttl = self._negative_timeout_seconds
        await self._set_negative(server_name, key_id, reason, ttl)
        if found is not None:
            raise _expired(found, at)
        raise KeyNotFound(f"no key {key_id} for {server_name}: {reason}")

    # --- fetching ---

    async def _fetch_shared(
        self, server_name: ServerName, key_id: KeyID, at: int, requester: str | None
    ) -> _FetchResult:
        """Fetch and store ``server_name``'s keys, sharing one fetch between callers.

        Joining a fetch already under way is free; starting one on a requester's behalf
        takes from its budget (else ``KeyNotFound`` at once) and waits for a free slot
        ``SLOT_WAIT_SECONDS`` at most.
        """
        task = self._inflight.get(server_name)
        if task is None:
            if requester is not None and not self._budget.take(requester):
                KEY_FETCHES_REFUSED.labels("client_budget").inc()
                raise KeyNotFound(f"no key {key_id} for {server_name}: {_BUDGET_SPENT}")
            wait = None if requester is None else SLOT_WAIT_SECONDS
            task = asyncio.create_task(self._fetch_in_slot(server_name, key_id, at, wait))
            self._inflight[server_name] = task

            def _forget(done: asyncio.Task[Any]) -> None:
                if self._inflight.get(server_name) is done:
                    del self._inflight[server_name]

            task.add_done_callback(_forget)
        # Shielded: one caller giving up must not cancel the fetch for the others.
        return await asyncio.shield(task)

    async def _fetch_in_slot(
        self, server_name: ServerName, key_id: KeyID, at: int, wait: float | None
    ) -> _FetchResult:
        """Fetch once a slot is free; past ``wait`` seconds (if given), refuse instead."""
        if wait is None:
            await self._fetch_slots.acquire()
        else:
            try:
                async with asyncio.timeout(wait):
                    await self._fetch_slots.acquire()
            except TimeoutError:
                KEY_FETCHES_REFUSED.labels("busy").inc()
                raise KeyNotFound(
                    f"no key {key_id} for {server_name}: key fetches busy; retry later"
                ) from None
        try:
            return await self._fetch_and_store(server_name, key_id, at)
        finally:
            self._fetch_slots.release()

    async def _fetch_and_store(
        self, server_name: ServerName, key_id: KeyID, at: int
    ) -> _FetchResult:
        """``(keys, problems, transient)``: ``transient`` when every failure may pass."""
        keys: dict[KeyID, FetchedKey] = {}
        problems: list[str] = []
        transient = True
        sources: list[tuple[str, Callable[[], Any]]] = []
        if self._direct:
            sources.append(("direct", lambda: self._fetch_direct(server_name)))
        if self._notary is not None:
            sources.append((self._notary[0], lambda: self._fetch_notary(server_name, key_id, at)))
        if not sources:
            problems.append("no key source configured")
        for source, fetch in sources:
            try:
                fetched: dict[KeyID, FetchedKey] = await fetch()
            except (FederationError, InvalidKeyDocument) as exc:
                KEY_FETCHES.labels(_source_label(source), "error").inc()
                logger.info(
                    "key fetch failed",
                    extra={"server": server_name, "source": source, "error": str(exc)},
                )
                problems.append(f"{source}: {exc}")
                if not isinstance(exc, TemporaryFederationError):
                    transient = False
                continue
            KEY_FETCHES.labels(_source_label(source), "ok").inc()
            await self._mark_compromised(fetched)
            fetched = self._drop_compromised(fetched)
            await self._store(fetched.values(), source)
            for kid, key in fetched.items():
                # Across sources, the longest validity wins.
                if kid not in keys or key.valid_until_ts > keys[kid].valid_until_ts:
                    keys[kid] = key
            if key_id in keys and _usable(keys[key_id], at):
                break
        # "Not published" (a source answered) and "no source" are definitive.
        transient = transient and bool(problems) and len(problems) == len(sources)
        return keys, problems, transient

    async def _fetch_direct(self, server_name: ServerName) -> dict[KeyID, FetchedKey]:
        doc = await self._client.get_json(
            server_name, "/_matrix/key/v2/server", signed=False, timeout=self._timeout
        )
        return verify_server_key_document(doc, server_name, now_ms=self._clock())

    async def _fetch_notary(
        self, server_name: ServerName, key_id: KeyID, at: int
    ) -> dict[KeyID, FetchedKey]:
        assert self._notary is not None
        notary_name = self._notary[0]
        minimum = requested_validity_ts(at, self._clock())  # never absurd (review L7)
        body = {"server_keys": {server_name: {key_id: {"minimum_valid_until_ts": minimum}}}}
        # The query API needs no authentication; unsigned spares the notary a lookup
        # of our own keys.
        response = await self._client.post_json(
            notary_name, "/_matrix/key/v2/query", body, signed=False, timeout=self._timeout
        )
        docs = response.get("server_keys") if isinstance(response, dict) else None
        if not isinstance(docs, list):
            raise InvalidKeyDocument(f"notary {notary_name} sent no server_keys list")
        keys: dict[KeyID, FetchedKey] = {}
        errors: list[str] = []
        now = self._clock()
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("server_name") != server_name:
                continue
            try:
                verified = verify_server_key_document(
                    doc, server_name, now_ms=now, notary=self._notary
                )
            except InvalidKeyDocument as exc:
                errors.append(str(exc))
                continue
            for kid, key in verified.items():
                if kid not in keys or key.valid_until_ts > keys[kid].valid_until_ts:
                    keys[kid] = key
        if not keys and errors:
            raise InvalidKeyDocument("; ".join(errors))
        return keys

    def _drop_compromised(self, keys: dict[KeyID, FetchedKey]) -> dict[KeyID, FetchedKey]:
        kept: dict[KeyID, FetchedKey] = {}
        for kid, key in keys.items():
            if bytes(key.verify_key) in COMPROMISED_KEYS:
                logger.warning(
                    "ignoring %s of %s: it is a publicly known compromised key",
                    kid,
                    key.server_name,
                )
                continue
            kept[kid] = key
        return kept

    async def _mark_compromised(self, keys: dict[KeyID, FetchedKey]) -> None:
        """Remember, for the unsafe signing key filter, which key IDs a server's own key
        document gives the compromised key (a signature under such a key ID is the
        server's own, not one anyone relaying the event could add)."""
        bad = [k for k in keys.values() if bytes(k.verify_key) in COMPROMISED_KEYS]
        if not bad:
            return
        COMPROMISED_KEYS_SEEN.inc(len(bad))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in bad:
                    pipe.set(
                        redis_keys.unsafe_signing_key(key.server_name, key.key_id),
                        1,
                        ex=redis_keys.UNSAFE_KEY_MARK_SECONDS,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            logger.warning("could not mark a compromised key in Redis: %s", exc)

    def _redis_failed(self, exc: BaseException) -> None:
        if is_redis_outage(exc):
            self._redis_outage.failed(exc)

    # --- storage layers ---

    async def _store(self, keys: Any, source: str) -> None:
        items: list[FetchedKey] = list(keys)
        if not items:
            return
        for key in items:
            self._memory.put(key)
        await self._to_redis(items)
        now = self._clock()
        try:
            async with self._pool.acquire() as conn:
                await conn.executemany(
                    """
                    INSERT INTO server_keys (server_name, key_id, verify_key, valid_until_ts,
                                             expired, fetched_from, fetched_at_ts)
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    ON CONFLICT (server_name, key_id) DO UPDATE SET
                        -- A notary's older copy must not shorten a validity we know.
                        valid_until_ts = CASE
                            WHEN server_keys.verify_key = EXCLUDED.verify_key
                                 AND NOT server_keys.expired AND NOT EXCLUDED.expired
                            THEN GREATEST(server_keys.valid_until_ts, EXCLUDED.valid_until_ts)
                            ELSE EXCLUDED.valid_until_ts END,
                        verify_key = EXCLUDED.verify_key,
                        expired = EXCLUDED.expired,
                        fetched_from = EXCLUDED.fetched_from,
                        fetched_at_ts = EXCLUDED.fetched_at_ts
                    """,
                    [
                        (
                            k.server_name,
                            k.key_id,
                            k.key_base64,
                            k.valid_until_ts,
                            k.expired,
                            source,
                            now,
                        )
                        for k in items
                    ],
                )
        except DATABASE_ERRORS as exc:
            # Keys still work from memory and Redis; the next fetch retries storing.
            logger.warning("could not store server keys in PostgreSQL: %s", exc)

    async def _to_redis(self, keys: list[FetchedKey]) -> None:
        if self._redis_outage.skipping:
            return
        now = self._clock()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                queued = False
                for key in keys:
                    ttl = key.valid_until_ts - now
                    if ttl <= 0:
                        continue
                    value = orjson.dumps(
                        {
                            "key": key.key_base64,
                            "valid_until_ts": key.valid_until_ts,
                            "expired": key.expired,
                        }
                    )
                    pipe.set(redis_keys.server_key(key.server_name, key.key_id), value, px=ttl)
                    queued = True
                if queued:
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            logger.warning("could not cache server keys in Redis: %s", exc)

    async def _from_redis(self, server_name: ServerName, key_id: KeyID) -> FetchedKey | None:
        if self._redis_outage.skipping:
            self._redis_outage.fell_back()
            return None
        try:
            raw = await self._redis.get(redis_keys.server_key(server_name, key_id))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            self._redis_outage.fell_back()
            logger.warning("Redis unavailable for key lookup: %s", exc)
            return None
        self._redis_outage.answered()
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            return FetchedKey(
                server_name,
                key_id,
                decode_verify_key(key_id, data["key"]),
                data["key"],
                int(data["valid_until_ts"]),
                bool(data["expired"]),
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed cached key %s of %s", key_id, server_name)
            return None

    async def _from_database(self, server_name: ServerName, key_id: KeyID) -> FetchedKey | None:
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT verify_key, valid_until_ts, expired FROM server_keys"
                    " WHERE server_name = $1 AND key_id = $2",
                    server_name,
                    key_id,
                )
        except DATABASE_ERRORS as exc:
            logger.warning("PostgreSQL unavailable for key lookup: %s", exc)
            return None
        if row is None:
            return None
        try:
            verify_key = decode_verify_key(key_id, row["verify_key"])
        except ValueError:
            return None
        return FetchedKey(
            server_name,
            key_id,
            verify_key,
            row["verify_key"],
            row["valid_until_ts"],
            row["expired"],
        )

    async def _negative_reason(self, server_name: ServerName, key_id: KeyID) -> str | None:
        if self._negative_seconds <= 0 and self._negative_timeout_seconds <= 0:
            return None
        local = self._local_negative.get((server_name, key_id))
        if local is not None:
            if time.monotonic() < local[0]:
                return local[1]
            del self._local_negative[(server_name, key_id)]
        if self._redis_outage.skipping:
            return None
        try:
            raw = await self._redis.get(redis_keys.server_keys_negative(server_name, key_id))
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return None
        if raw is None:
            return None
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    async def _set_negative(
        self, server_name: ServerName, key_id: KeyID, reason: str, seconds: int
    ) -> None:
        if seconds <= 0:
            return
        if not self._redis_outage.skipping:
            try:
                await self._redis.set(
                    redis_keys.server_keys_negative(server_name, key_id),
                    reason[:500],
                    ex=seconds,
                )
                return
            except (RedisError, OSError) as exc:
                self._redis_failed(exc)
                logger.warning("could not record negative key lookup in Redis: %s", exc)
        # Kept here instead, so this replica does not fetch it again on every request.
        self._redis_outage.fell_back()
        entry = (server_name, key_id)
        self._local_negative[entry] = (time.monotonic() + seconds, reason[:500])
        self._local_negative.move_to_end(entry)
        while len(self._local_negative) > LOCAL_NEGATIVE_CACHE_SIZE:
            self._local_negative.popitem(last=False)

    def clear_memory_cache(self) -> None:
        """Forget the in-process cache (Redis and PostgreSQL are untouched)."""
        self._memory.clear()


def _source_label(source: str) -> str:
    # The metric label is bounded: "direct" or "notary", never a server name.
    return "direct" if source == "direct" else "notary"


def _expired(key: FetchedKey, at: int) -> KeyExpired:
    return KeyExpired(
        f"key {key.key_id} of {key.server_name} was valid only until {key.valid_until_ts}"
        f" (asked about {at})"
    )

"""The keyring against real local HTTPS key servers and notaries, Redis and PostgreSQL.

Key servers run on 127.0.0.1 (``https_server`` from conftest, certificates from the
test CA), so the SSRF guard is configured to allow loopback and TLS trusts the test CA.
Every test uses fresh server names, since the PostgreSQL database lives for the session.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from unpaddedbase64 import encode_base64

from tests.service_processes import free_port
from warden import redis_keys
from warden.federation.client import FederationClient
from warden.federation.keyring import (
    COMPROMISED_KEYS,
    FetchBudget,
    KeyExpired,
    KeyNotFound,
    Keyring,
)
from warden.federation.server_key_document import build_server_key_document, current_time_ms
from warden.federation.xmatrix import sign_request, verify_request
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import key_id_of, verify_key_base64
from warden.runtime.client_penalties import client_bucket
from warden.settings import DEFAULT_DENIED_NETWORKS

OUR_NAME = "warden.test"
OUR_KEY = generate_signing_key("a_ours")
NOTARY_KEY = generate_signing_key("a_nota")
DENIED_WITHOUT_LOOPBACK = [
    n for n in DEFAULT_DENIED_NETWORKS.split(",") if n not in {"127.0.0.0/8", "::1/128"}
]


@dataclass
class KeyServer:
    """A key server and/or notary whose answers the test controls; counts requests."""

    serve: Callable[[], Any] | None = None  # GET /_matrix/key/v2/server body
    notarise: Callable[[Any], Any] | None = None  # POST /_matrix/key/v2/query body
    status: int = 200
    delay: float = 0.0
    hits: int = 0
    bodies: list[Any] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    name: str = ""

    def app(self) -> Starlette:
        async def server_keys(request: Request) -> JSONResponse:
            return await self._answer(request, None)

        async def query(request: Request) -> JSONResponse:
            return await self._answer(request, await request.json())

        return Starlette(
            routes=[
                Route("/_matrix/key/v2/server", server_keys, methods=["GET"]),
                Route("/_matrix/key/v2/query", query, methods=["POST"]),
            ]
        )

    async def _answer(self, request: Request, body: Any) -> JSONResponse:
        self.hits += 1
        self.bodies.append(body)
        self.auth_headers.append(request.headers.get("authorization"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return JSONResponse({"errcode": "M_UNKNOWN", "error": "down"}, self.status)
        answer = self.serve() if body is None and self.serve else None
        if body is not None and self.notarise:
            answer = self.notarise(body)
        if answer is None:
            return JSONResponse({"errcode": "M_NOT_FOUND", "error": "no"}, 404)
        return JSONResponse(answer)


KeyringFactory = Callable[..., Keyring]


@pytest.fixture
async def key_server_start(https_server: Any) -> Callable[..., Any]:
    """Start a ``KeyServer`` on 127.0.0.1; its ``name`` is set to ``127.0.0.1:<port>``."""

    async def start(server: KeyServer) -> KeyServer:
        local = await https_server(server.app(), host="127.0.0.1", names=["127.0.0.1"])
        server.name = local.address
        return server

    return start


@pytest.fixture
async def key_server_keyring(
    make_settings: Callable[..., Any],
    tls_ca_file: str,
    redis_client: aioredis.Redis,
    pg_pool: Any,
) -> AsyncIterator[KeyringFactory]:
    """Build keyrings on the test Redis and PostgreSQL, each with a real client."""
    clients: list[FederationClient] = []

    def build(
        *,
        direct: bool = True,
        notary: str = "",
        negative: int = 60,
        clock: Callable[[], int] = current_time_ms,
        fetch_budget: FetchBudget | None = None,
        redis: aioredis.Redis | None = None,
        **overrides: Any,
    ) -> Keyring:
        values: dict[str, Any] = {
            "homeserver_denied_networks": DENIED_WITHOUT_LOOPBACK,
            "federation_ca_file": tls_ca_file,
            "direct_key_fetching": direct,
            "key_query_server": notary,
            "key_negative_cache_seconds": negative,
            "key_fetch_timeout_seconds": 5.0,
        }
        values.update(overrides)
        settings = make_settings(**values)
        client = FederationClient(settings, OUR_KEY)
        clients.append(client)
        return Keyring(
            settings,
            client,
            redis_client if redis is None else redis,
            pg_pool,
            our_server_name=OUR_NAME,
            our_keys={key_id_of(OUR_KEY): get_verify_key(OUR_KEY)},
            clock=clock,
            fetch_budget=fetch_budget,
        )

    try:
        yield build
    finally:
        for client in clients:
            await client.aclose()


def self_signed(server: KeyServer, key: Any, **kwargs: Any) -> Callable[[], Any]:
    """A ``serve`` callback publishing ``key`` for ``server`` (name read at request time)."""
    return lambda: build_server_key_document(server.name, key, **kwargs)


# --- direct fetching ---


async def test_direct_fetch_is_cached_in_memory_redis_and_postgres(
    key_server_start: Any,
    key_server_keyring: KeyringFactory,
    redis_client: aioredis.Redis,
    pg_pool: Any,
) -> None:
    remote = generate_signing_key("a_rem1")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring()
    name, kid = ServerName(server.name), KeyID("ed25519:a_rem1")

    key = await keyring.get_verify_key(name, kid)
    assert bytes(key) == bytes(get_verify_key(remote))
    assert server.hits == 1
    assert server.auth_headers == [None]  # key requests are unsigned
    await keyring.get_verify_key(name, kid)
    assert server.hits == 1

    ttl_ms = await redis_client.pttl(redis_keys.server_key(name, kid))
    assert 0 < ttl_ms <= 24 * 3600 * 1000
    row = await pg_pool.fetchrow(
        "SELECT verify_key, expired, fetched_from FROM server_keys"
        " WHERE server_name = $1 AND key_id = $2",
        name,
        kid,
    )
    assert dict(row) == {
        "verify_key": verify_key_base64(remote),
        "expired": False,
        "fetched_from": "direct",
    }


async def test_verify_request_end_to_end(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    remote = generate_signing_key("a_rem2")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring()
    body = {"event": "x"}
    header = sign_request(server.name, OUR_NAME, "POST", "/_matrix/policy/v1/sign", body, remote)
    origin = await verify_request(
        "POST", "/_matrix/policy/v1/sign", body, [header], OUR_NAME, keyring
    )
    assert origin == server.name
    # A key the server does not publish fails, with the reason in the message.
    stranger = generate_signing_key("a_strg")
    header = sign_request(server.name, OUR_NAME, "POST", "/p", body, stranger)
    with pytest.raises(Exception, match=r"No usable key.*ed25519:a_strg not published"):
        await verify_request("POST", "/p", body, [header], OUR_NAME, keyring)


async def test_our_own_keys_are_never_fetched(key_server_keyring: KeyringFactory) -> None:
    keyring = key_server_keyring(direct=True, notary="")
    key = await keyring.get_verify_key(ServerName(OUR_NAME), key_id_of(OUR_KEY))
    assert bytes(key) == bytes(get_verify_key(OUR_KEY))
    with pytest.raises(KeyNotFound, match="not one of our own keys"):
        await keyring.get_verify_key(ServerName(OUR_NAME), KeyID("ed25519:nope"))


async def test_concurrent_lookups_share_one_fetch(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    remote = generate_signing_key("a_rem3")
    server = await key_server_start(KeyServer(delay=0.3))
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring()
    keys = await asyncio.gather(
        *(
            keyring.get_verify_key(ServerName(server.name), KeyID("ed25519:a_rem3"))
            for _ in range(10)
        )
    )
    assert {bytes(k) for k in keys} == {bytes(get_verify_key(remote))}
    assert server.hits == 1


async def test_compromised_key_is_refused(
    key_server_start: Any, key_server_keyring: KeyringFactory, redis_client: aioredis.Redis
) -> None:
    # The key Go's ed25519.GenerateKey makes from math/rand seed 0.
    seed = bytes.fromhex("0194fdc2fa2ffcc041d3ff12045b73c86e4ff95ff662a5eee82abdf44a2d0b75")
    bad = decode_signing_key_base64("ed25519", "a_bad0", encode_base64(seed))
    assert bytes(get_verify_key(bad)) in COMPROMISED_KEYS
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, bad)
    keyring = key_server_keyring()
    with pytest.raises(KeyNotFound):
        await keyring.get_verify_key(ServerName(server.name), KeyID("ed25519:a_bad0"))
    assert server.hits == 1
    # Marked for the unsafe signing key filter: this server itself uses the key.
    mark = redis_keys.unsafe_signing_key(server.name, "ed25519:a_bad0")
    assert 0 < await redis_client.ttl(mark) <= redis_keys.UNSAFE_KEY_MARK_SECONDS
    # A server publishing a good key gets no mark.
    good = generate_signing_key("a_good0")
    other = await key_server_start(KeyServer())
    other.serve = self_signed(other, good)
    await keyring.get_verify_key(ServerName(other.name), KeyID("ed25519:a_good0"))
    assert not await redis_client.exists(
        redis_keys.unsafe_signing_key(other.name, "ed25519:a_good0")
    )


# --- expiry ---


async def test_expired_key_is_refetched(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    remote = generate_signing_key("a_rem4")
    clock = {"now": current_time_ms()}
    server = await key_server_start(KeyServer())
    server.serve = lambda: build_server_key_document(
        server.name, remote, valid_for_ms=1000, now_ms=clock["now"]
    )
    keyring = key_server_keyring(negative=60, clock=lambda: clock["now"])
    name, kid = ServerName(server.name), KeyID("ed25519:a_rem4")

    await keyring.get_verify_key(name, kid)
    assert server.hits == 1
    clock["now"] += 500
    await keyring.get_verify_key(name, kid)
    assert server.hits == 1  # still valid

    clock["now"] += 2000  # past valid_until_ts: the server is asked again
    await keyring.get_verify_key(name, kid)
    assert server.hits == 2

    # The server now keeps serving a document that has run out.
    stale_at = clock["now"]
    server.serve = lambda: build_server_key_document(
        server.name, remote, valid_for_ms=1, now_ms=stale_at - 10
    )
    clock["now"] += 2000
    with pytest.raises(KeyExpired):
        await keyring.get_verify_key(name, kid)
    assert server.hits == 3
    # ... and the negative cache keeps us from asking again right away.
    with pytest.raises(KeyExpired):
        await keyring.get_verify_key(name, kid)
    assert server.hits == 3
    # A lookup for a time the key was valid still works, without a fetch.
    assert await keyring.get_verify_key(name, kid, at_ms=stale_at - 5000)
    assert server.hits == 3


async def test_old_verify_keys_are_valid_only_before_their_expiry(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    current = generate_signing_key("a_cur5")
    old = generate_signing_key("a_old5")
    now = current_time_ms()
    expired_ts = now - 10_000
    server = await key_server_start(KeyServer())
    server.serve = self_signed(
        server,
        current,
        old_verify_keys={KeyID("ed25519:a_old5"): (get_verify_key(old), expired_ts)},
    )
    keyring = key_server_keyring()
    name, kid = ServerName(server.name), KeyID("ed25519:a_old5")

    key = await keyring.get_verify_key(name, kid, at_ms=expired_ts - 1)
    assert bytes(key) == bytes(get_verify_key(old))
    assert server.hits == 1
    with pytest.raises(KeyExpired):
        await keyring.get_verify_key(name, kid, at_ms=expired_ts + 1)
    with pytest.raises(KeyExpired):
        await keyring.get_verify_key(name, kid)
    assert server.hits == 1  # an old key will not come back: no refetch
    # X-Matrix uses "now", so a request signed with the old key is refused.
    header = sign_request(server.name, OUR_NAME, "GET", "/x", None, old)
    with pytest.raises(Exception, match="valid only until"):
        await verify_request("GET", "/x", None, [header], OUR_NAME, keyring)


# --- negative cache ---


async def test_negative_cache_limits_fetches_for_unknown_keys(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    remote = generate_signing_key("a_rem6")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring(negative=1)
    name = ServerName(server.name)

    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(name, KeyID("ed25519:unknown"))
    assert server.hits == 1
    with pytest.raises(KeyNotFound, match="recently looked up"):
        await keyring.get_verify_key(name, KeyID("ed25519:unknown"))
    # Another replica (another Keyring on the same Redis) honours it too.
    with pytest.raises(KeyNotFound, match="recently looked up"):
        await key_server_keyring(negative=1).get_verify_key(name, KeyID("ed25519:unknown"))
    assert server.hits == 1
    # The entry is per key ID: another key of the same server is looked up (review H8).
    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(name, KeyID("ed25519:other"))
    assert server.hits == 2

    await asyncio.sleep(1.2)
    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(name, KeyID("ed25519:unknown"))
    assert server.hits == 3


async def test_fetch_failure_is_negatively_cached(
    key_server_start: Any,
    key_server_keyring: KeyringFactory,
    redis_client: aioredis.Redis,
) -> None:
    server = await key_server_start(KeyServer(status=502))
    keyring = key_server_keyring(negative=30)
    name = ServerName(server.name)
    with pytest.raises(KeyNotFound, match=r"direct: .*502"):
        await keyring.get_verify_key(name, KeyID("ed25519:any"))
    with pytest.raises(KeyNotFound, match="recently looked up"):
        await keyring.get_verify_key(name, KeyID("ed25519:any"))
    assert server.hits == 1
    ttl = await redis_client.ttl(redis_keys.server_keys_negative(name, "ed25519:any"))
    # A 502 may pass: kept PS_KEY_NEGATIVE_CACHE_TIMEOUT_SECONDS (10), not 30.
    assert 0 < ttl <= 10


def _key_cache_fallbacks() -> float:
    return REGISTRY.get_sample_value("warden_redis_fallbacks_total", {"use": "key_cache"}) or 0.0


async def test_without_redis_keys_come_from_postgresql_and_negatives_are_kept_locally(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    """M6: Redis unreachable. A key stored in PostgreSQL is found there without a fetch;
    a failed lookup is remembered in process, so it is not fetched on every request."""
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        remote = generate_signing_key("a_nore")
        server = await key_server_start(KeyServer())
        server.serve = self_signed(server, remote)
        name = ServerName(server.name)
        await key_server_keyring().get_verify_key(name, key_id_of(remote))  # stored
        assert server.hits == 1
        before = _key_cache_fallbacks()

        keyring = key_server_keyring(redis=dead, negative=30)
        assert await keyring.get_verify_key(name, key_id_of(remote)) == get_verify_key(remote)
        assert server.hits == 1  # from PostgreSQL
        for _ in range(3):
            with pytest.raises(KeyNotFound):
                await keyring.get_verify_key(name, KeyID("ed25519:missing"))
        assert server.hits == 2  # fetched once, then remembered in process
        assert _key_cache_fallbacks() > before
    finally:
        await dead.aclose()


# --- bounds on fetches made before authentication (review H8) ---


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("warden_key_fetches_refused_total", {"reason": reason}) or 0.0


async def test_a_made_up_key_id_that_timed_out_does_not_block_the_real_key(
    key_server_start: Any, key_server_keyring: KeyringFactory, redis_client: aioredis.Redis
) -> None:
    # An attacker names a real server with a made-up key ID while the lookup is slow
    # (a notary or key server slowed down on purpose): the failure is remembered for
    # that key ID only, and briefly.
    remote = generate_signing_key("a_rmH8")
    server = await key_server_start(KeyServer(delay=2.0))
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring(key_fetch_timeout_seconds=0.5)
    name = ServerName(server.name)
    with pytest.raises(KeyNotFound, match="direct"):
        await keyring.get_verify_key(name, KeyID("ed25519:madeup"), requester="192.0.2.1")
    ttl = await redis_client.ttl(redis_keys.server_keys_negative(name, "ed25519:madeup"))
    assert 0 < ttl <= 10  # PS_KEY_NEGATIVE_CACHE_TIMEOUT_SECONDS, not the full minute
    assert not await redis_client.exists(redis_keys.server_keys_negative(name, "ed25519:a_rmH8"))

    server.delay = 0.0
    key = await keyring.get_verify_key(name, KeyID("ed25519:a_rmH8"))
    assert bytes(key) == bytes(get_verify_key(remote))


async def test_definitive_failures_are_remembered_longer_than_timeouts(
    key_server_start: Any, key_server_keyring: KeyringFactory, redis_client: aioredis.Redis
) -> None:
    remote = generate_signing_key("a_rmD8")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring(negative=60, key_negative_cache_timeout_seconds=5)
    name = ServerName(server.name)
    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(name, KeyID("ed25519:nope"))
    ttl = await redis_client.ttl(redis_keys.server_keys_negative(name, "ed25519:nope"))
    assert 5 < ttl <= 60


async def test_key_fetches_are_budgeted_per_client_address(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    remote = generate_signing_key("a_rmB8")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    budget = FetchBudget(3, clock=lambda: 0.0)  # one minute that never ends
    keyring = key_server_keyring(fetch_budget=budget)
    name = ServerName(server.name)
    attacker = "192.0.2.7"
    for i in range(3):
        with pytest.raises(KeyNotFound, match="not published"):
            await keyring.get_verify_key(name, KeyID(f"ed25519:x{i}"), requester=attacker)
    assert server.hits == 3
    before = _refused("client_budget")
    with pytest.raises(KeyNotFound, match="too many key fetches"):
        await keyring.get_verify_key(name, KeyID("ed25519:x3"), requester=attacker)
    assert server.hits == 3  # refused without a fetch
    assert _refused("client_budget") == before + 1
    # A key already known costs no budget, even for that client.
    key = await keyring.get_verify_key(name, KeyID("ed25519:a_rmB8"), requester=attacker)
    assert bytes(key) == bytes(get_verify_key(remote))
    # Another client, and lookups on nobody's behalf, still fetch.
    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(name, KeyID("ed25519:x4"), requester="192.0.2.8")
    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(name, KeyID("ed25519:x5"))
    assert server.hits == 5


async def test_a_client_that_spent_its_budget_gets_no_storage_lookups(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    """Past its fetch budget a client's lookups of keys not in memory fail at once, with
    no Redis or PostgreSQL round trip (a made-up server name each time costs almost
    nothing); keys in memory, and other clients, are unaffected."""
    remote = generate_signing_key("a_rmC8")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    name, key_id = ServerName(server.name), KeyID("ed25519:a_rmC8")
    await key_server_keyring().get_verify_key(name, key_id)  # now in Redis and PostgreSQL
    assert server.hits == 1

    budget = FetchBudget(1, clock=lambda: 0.0)  # one minute that never ends
    keyring = key_server_keyring(fetch_budget=budget)  # a replica with nothing in memory
    attacker = "192.0.2.9"
    assert budget.take(attacker) and budget.spent(attacker)
    before = _refused("client_budget")
    with pytest.raises(KeyNotFound, match="too many key fetches"):
        await keyring.get_verify_key(name, key_id, requester=attacker)
    assert _refused("client_budget") == before + 1
    # Another client finds the stored key (and brings it into memory) ...
    key = await keyring.get_verify_key(name, key_id, requester="192.0.2.10")
    assert bytes(key) == bytes(get_verify_key(remote))
    # ... where the spent client finds it too.
    assert bytes(await keyring.get_verify_key(name, key_id, requester=attacker)) == bytes(key)
    assert server.hits == 1


def test_fetch_budget_windows_and_ipv6_prefixes() -> None:
    now = [30.0]
    budget = FetchBudget(2, max_clients=3, clock=lambda: now[0])
    # Addresses in one IPv6 /64 share a budget.
    assert client_bucket("2001:db8::1") == client_bucket("2001:db8::ffff:2")
    assert budget.take("2001:db8::1") and budget.take("2001:db8::2")
    assert not budget.take("2001:db8::3")
    assert budget.take("2001:db8:0:1::1")  # another /64
    # At most max_clients clients are tracked; a newcomer waits for the oldest minute.
    now[0] = 50.0
    assert budget.take("192.0.2.1")
    assert not budget.take("192.0.2.2")
    # Each client's minute runs from its first fetch.
    now[0] = 89.0
    assert not budget.take("2001:db8::3")
    now[0] = 90.0
    assert budget.take("2001:db8::3")  # its minute is over; and it made room
    assert budget.take("192.0.2.2")  # the oldest entry left made room
    assert not budget.take("192.0.2.3")
    # ``spent`` looks without charging.
    assert budget.spent("2001:db8::3") is False and budget.take("2001:db8::3")
    assert budget.spent("2001:db8::3") and not budget.spent("192.0.2.99")


async def test_a_client_cannot_start_a_fetch_while_every_slot_is_taken(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    slow_key, other_key = generate_signing_key("a_rmS1"), generate_signing_key("a_rmS2")
    slow = await key_server_start(KeyServer(delay=3.0))  # longer than SLOT_WAIT_SECONDS
    slow.serve = self_signed(slow, slow_key)
    other = await key_server_start(KeyServer())
    other.serve = self_signed(other, other_key)
    keyring = key_server_keyring(key_fetch_concurrency=1)
    first = asyncio.create_task(
        keyring.get_verify_key(ServerName(slow.name), KeyID("ed25519:a_rmS1"), requester="a")
    )
    while slow.hits == 0:
        await asyncio.sleep(0.01)
    before = _refused("busy")
    with pytest.raises(KeyNotFound, match="busy"):
        await keyring.get_verify_key(ServerName(other.name), KeyID("ed25519:a_rmS2"), requester="b")
    assert other.hits == 0
    assert _refused("busy") == before + 1
    # A lookup on nobody's behalf (an event's signature) waits for the slot as long as
    # it takes.
    key = await keyring.get_verify_key(ServerName(other.name), KeyID("ed25519:a_rmS2"))
    assert bytes(key) == bytes(get_verify_key(other_key))
    assert bytes(await first) == bytes(get_verify_key(slow_key))


# --- sharing through Redis and PostgreSQL ---


async def test_keys_are_shared_through_redis_and_survive_a_flush(
    key_server_start: Any,
    key_server_keyring: KeyringFactory,
    redis_client: aioredis.Redis,
) -> None:
    remote = generate_signing_key("a_rem7")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    name, kid = ServerName(server.name), KeyID("ed25519:a_rem7")

    await key_server_keyring().get_verify_key(name, kid)
    assert server.hits == 1
    # A second replica finds it in Redis.
    await key_server_keyring().get_verify_key(name, kid)
    assert server.hits == 1
    # After Redis loses everything, a third finds it in PostgreSQL, and puts it back.
    await redis_client.flushdb()
    third = key_server_keyring()
    key = await third.get_verify_key(name, kid)
    assert bytes(key) == bytes(get_verify_key(remote))
    assert server.hits == 1
    assert await redis_client.exists(redis_keys.server_key(name, kid))


# --- notary ---


def notary_setting(notary: KeyServer, key: Any = NOTARY_KEY) -> str:
    return f"{notary.name},{key_id_of(key)},{verify_key_base64(key)}"


def notarise_with(
    notary: KeyServer, docs: Callable[[], list[dict[str, Any]]], key: Any = NOTARY_KEY
) -> Callable[[Any], Any]:
    return lambda body: {
        "server_keys": [sign_json(copy.deepcopy(d), notary.name, key) for d in docs()]
    }


async def test_notary_fetch(key_server_start: Any, key_server_keyring: KeyringFactory) -> None:
    origin = f"remote-{uuid.uuid4().hex[:8]}.test"  # never resolved: only the notary is asked
    remote = generate_signing_key("a_rem8")
    notary = await key_server_start(KeyServer())
    notary.notarise = notarise_with(notary, lambda: [build_server_key_document(origin, remote)])
    keyring = key_server_keyring(direct=False, notary=notary_setting(notary))
    before = current_time_ms()
    key = await keyring.get_verify_key(ServerName(origin), KeyID("ed25519:a_rem8"))
    assert bytes(key) == bytes(get_verify_key(remote))
    assert notary.hits == 1
    (body,) = notary.bodies
    minimum = body["server_keys"][origin]["ed25519:a_rem8"]["minimum_valid_until_ts"]
    assert before <= minimum <= current_time_ms()
    assert notary.auth_headers == [None]


async def test_notary_response_not_signed_by_pinned_key_is_rejected(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    origin = f"remote-{uuid.uuid4().hex[:8]}.test"
    remote = generate_signing_key("a_rem9")
    impostor = generate_signing_key(NOTARY_KEY.version)  # same key ID, other key
    notary = await key_server_start(KeyServer())
    notary.notarise = notarise_with(
        notary, lambda: [build_server_key_document(origin, remote)], key=impostor
    )
    keyring = key_server_keyring(direct=False, notary=notary_setting(notary))
    with pytest.raises(KeyNotFound, match=r"notary's signature .* does not verify"):
        await keyring.get_verify_key(ServerName(origin), KeyID("ed25519:a_rem9"))


async def test_notary_response_with_tampered_self_signature_is_rejected(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    origin = f"remote-{uuid.uuid4().hex[:8]}.test"
    remote = generate_signing_key("a_remA")
    attacker = generate_signing_key("a_remA")

    def tampered() -> list[dict[str, Any]]:
        # The notary swaps in its own choice of key but keeps the origin's signature.
        doc = build_server_key_document(origin, remote)
        doc["verify_keys"]["ed25519:a_remA"]["key"] = verify_key_base64(attacker)
        return [doc]

    notary = await key_server_start(KeyServer())
    notary.notarise = notarise_with(notary, tampered)
    keyring = key_server_keyring(direct=False, notary=notary_setting(notary))
    with pytest.raises(KeyNotFound, match="a_remA does not verify"):
        await keyring.get_verify_key(ServerName(origin), KeyID("ed25519:a_remA"))


async def test_notary_documents_for_other_servers_are_ignored(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    origin = f"remote-{uuid.uuid4().hex[:8]}.test"
    other = generate_signing_key("a_remB")
    notary = await key_server_start(KeyServer())
    notary.notarise = notarise_with(
        notary, lambda: [build_server_key_document("someone.else", other)]
    )
    keyring = key_server_keyring(direct=False, notary=notary_setting(notary))
    with pytest.raises(KeyNotFound, match="not published"):
        await keyring.get_verify_key(ServerName(origin), KeyID("ed25519:a_remB"))


async def test_direct_failure_falls_back_to_notary(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    remote = generate_signing_key("a_remC")
    origin = await key_server_start(KeyServer(status=500))  # the origin's key server is down
    notary = await key_server_start(KeyServer())
    notary.notarise = notarise_with(
        notary, lambda: [build_server_key_document(origin.name, remote)]
    )
    keyring = key_server_keyring(direct=True, notary=notary_setting(notary))
    key = await keyring.get_verify_key(ServerName(origin.name), KeyID("ed25519:a_remC"))
    assert bytes(key) == bytes(get_verify_key(remote))
    assert (origin.hits, notary.hits) == (1, 1)


async def test_key_fetches_are_counted_by_source_and_outcome(
    key_server_start: Any, key_server_keyring: KeyringFactory
) -> None:
    from prometheus_client import REGISTRY

    def count(outcome: str) -> float:
        labels = {"source": "direct", "outcome": outcome}
        return REGISTRY.get_sample_value("warden_key_fetches_total", labels) or 0.0

    ok_before, err_before = count("ok"), count("error")
    remote = generate_signing_key("a_met1")
    server = await key_server_start(KeyServer())
    server.serve = self_signed(server, remote)
    keyring = key_server_keyring()
    await keyring.get_verify_key(ServerName(server.name), KeyID("ed25519:a_met1"))
    assert count("ok") == ok_before + 1

    broken = await key_server_start(KeyServer(status=500))
    from warden.federation.keyring_errors import KeyringError

    with pytest.raises(KeyringError):
        await keyring.get_verify_key(ServerName(broken.name), KeyID("ed25519:a_met1"))
    assert count("error") == err_before + 1

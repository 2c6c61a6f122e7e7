"""``POST /_policyserv/v1/check/event_id`` (issue 13), black-box over HTTP: the gateway
app with the route, community bearer tokens in the test PostgreSQL, the real filter
worker's evaluation service on real NATS and Redis, and remote homeservers that are
real HTTPS servers on loopback serving their key document and
``/_matrix/federation/v1/event/{eventId}`` with events hashed and signed by Synapse's
code. The fetch goes through the federation client (network guard, test CA).
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY
from signedjson.key import get_verify_key
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.gateway.conftest import DENIED_WITHOUT_LOOPBACK
from tests.gateway.policy_harness import GATEWAY_NAME, Origin, new_room_id
from tests.gateway.real_worker import real_worker  # noqa: F401
from tests.service_processes import ServiceProcess
from warden.federation.client import FederationClient
from warden.federation.event_fetch import EventFetcher
from warden.federation.keyring import Keyring
from warden.federation.server_key_document import build_server_key_document
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.policy.harms import HARMS_FIELD
from warden.runtime.health import Health
from warden.runtime.identity import Identity
from warden.settings import Settings
from warden.storage.communities import create_community, hash_access_token
from warden.storage.rooms import put_room
from warden.storage.verdicts import get_verdict
from warden_gateway.app import build_app
from warden_gateway.community_auth import CommunityAuth
from warden_gateway.event_id_check import CHECK_EVENT_ID_PATH, EventIdCheck
from warden_gateway.room_cache import RoomCache
from warden_gateway.verdict_source import VerdictSource

SPAM = "buy spammy pills now"  # the instance default keywords: "spammy", "spam"


@dataclass
class EventServer:
    """A remote homeserver serving its keys and the events the test gives it."""

    origin: Origin
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetches: int = 0
    hang: bool = False  # never answer /event
    padding: int = 0  # bytes of junk added to /event answers

    @property
    def name(self) -> str:
        return self.origin.name

    def serve(self, event: dict[str, Any], room_version: str) -> str:
        """Serve ``event`` under its ID; return the ID."""
        event_id = str(compute_event_id(get_room_version(room_version), event))
        self.events[event_id] = event
        return event_id

    def app(self) -> Starlette:
        async def keys(request: Request) -> Response:
            doc = build_server_key_document(self.name, self.origin.key)
            return Response(orjson.dumps(doc), media_type="application/json")

        async def event(request: Request) -> Response:
            self.fetches += 1
            if self.hang:
                await asyncio.sleep(30)
            pdu = self.events.get(str(request.path_params["event_id"]))
            if pdu is None:
                body = {"errcode": "M_NOT_FOUND", "error": "Could not find event"}
                return Response(orjson.dumps(body), status_code=404)
            answer = {"origin": self.name, "origin_server_ts": 1, "pdus": [pdu]}
            if self.padding:
                answer["padding"] = "x" * self.padding
            return Response(orjson.dumps(answer), media_type="application/json")

        return Starlette(
            routes=[
                Route("/_matrix/key/v2/server", keys, methods=["GET"]),
                Route("/_matrix/federation/v1/event/{event_id:path}", event, methods=["GET"]),
            ]
        )


@dataclass
class Caller:
    """A community and its access token."""

    community_id: str
    token: str


@dataclass
class Checker:
    """An in-process gateway with the check/event_id route."""

    client: httpx.AsyncClient
    pool: asyncpg.Pool

    async def check(self, caller: Caller | None, body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {caller.token}"} if caller else {}
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return await self.client.post(CHECK_EVENT_ID_PATH, content=content, headers=headers)


@pytest.fixture
async def start_server(https_server: Any) -> Callable[..., Awaitable[EventServer]]:
    async def start() -> EventServer:
        server = EventServer(Origin())
        local = await https_server(server.app(), host="127.0.0.1", names=["127.0.0.1"])
        server.origin.name = local.address
        return server

    return start


@pytest.fixture
async def new_caller(pg_pool: asyncpg.Pool) -> Callable[[], Awaitable[Caller]]:
    async def make() -> Caller:
        community = await create_community(pg_pool, "community " + secrets.token_hex(4))
        token = "pst_" + secrets.token_urlsafe(32)
        await pg_pool.execute(
            "UPDATE communities SET api_access_token_hash = $2 WHERE id = $1",
            community.community_id,
            hash_access_token(token),
        )
        return Caller(community.community_id, token)

    return make


@pytest.fixture
async def make_checker(
    make_settings: Callable[..., Settings],
    tls_ca_file: str,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    identity: Identity,
    evaluate_subject: str,
    real_worker: Any,  # noqa: F811
) -> AsyncIterator[Callable[..., Awaitable[Checker]]]:
    closers: list[Callable[[], Awaitable[None]]] = []

    async def build(servers: list[str], **overrides: Any) -> Checker:
        values: dict[str, Any] = {
            "homeserver_denied_networks": DENIED_WITHOUT_LOOPBACK,
            "federation_ca_file": tls_ca_file,
            "direct_key_fetching": True,
            "key_query_server": "",
            "key_fetch_timeout_seconds": 5.0,
            "verdict_timeout_seconds": 10.0,
            "event_fetch_servers": servers,
            "event_fetch_timeout_seconds": 5.0,
            "event_fetch_total_timeout_seconds": 10.0,
        }
        values.update(overrides)
        settings = make_settings(**values)
        federation = FederationClient(settings, identity.federation_key)
        closers.append(federation.aclose)
        keyring = Keyring(
            settings,
            federation,
            redis_client,
            pg_pool,
            our_server_name=GATEWAY_NAME,
            our_keys={identity.federation_key_id: get_verify_key(identity.federation_key)},
        )
        fetcher = EventFetcher(
            federation,
            keyring,
            settings.event_fetch_servers,
            timeout_seconds=settings.event_fetch_timeout_seconds,
            total_timeout_seconds=settings.event_fetch_total_timeout_seconds,
            concurrency=settings.event_fetch_concurrency,
            max_response_bytes=settings.event_fetch_max_response_bytes,
            max_pdu_bytes=settings.max_pdu_bytes,
        )
        route = EventIdCheck(
            authenticate=CommunityAuth(
                pg_pool, rate_limiter=None, failures_per_minute=1000
            ).authenticate,
            pool=pg_pool,
            rooms=RoomCache(pg_pool),
            verdicts=VerdictSource(
                nats_client,
                timeout_seconds=settings.verdict_timeout_seconds,
                subject=evaluate_subject,
            ),
            fetcher=fetcher,
        )
        app = build_app(identity, Health("gateway"), settings=settings, event_id_check=route)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60
        )
        closers.append(client.aclose)
        return Checker(client, pg_pool)

    try:
        yield build
    finally:
        for close in reversed(closers):
            await close()


def _event(server: EventServer, room_id: str, version: str, body: str, user: str) -> dict[str, Any]:
    return server.origin.event(room_id, version, body=body, sender=f"@{user}:{server.name}")


async def _protected_room(pool: asyncpg.Pool, caller: Caller, version: str) -> str:
    room_id = new_room_id(version)
    await put_room(pool, room_id, version, caller.community_id)
    return room_id


def _answers(outcome: str) -> float:
    value = REGISTRY.get_sample_value("warden_event_fetch_answers_total", {"outcome": outcome})
    return value or 0.0


@pytest.mark.parametrize("version", ["1", "10", "12"])
async def test_fetched_event_is_judged_allowed_or_refused(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
    version: str,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, version)
    fine = remote.serve(_event(remote, room_id, version, "hello there", "alice"), version)
    spam = remote.serve(_event(remote, room_id, version, SPAM, "mallory"), version)

    r = await checker.check(caller, {"event_id": fine})
    assert (r.status_code, r.json()) == (200, {})
    r = await checker.check(caller, {"event_id": spam})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["errcode"] == "M_FORBIDDEN"
    assert body["harms"] and body["harms"] == body[HARMS_FIELD]
    # Judged by the workers like /sign: stored for the caller's community and room.
    stored = await get_verdict(pg_pool, spam)
    assert stored is not None and stored.prohibited
    assert (stored.community_id, stored.room_id) == (caller.community_id, room_id)
    assert stored.origin == remote.name
    allowed = await get_verdict(pg_pool, fine)
    assert allowed is not None and not allowed.prohibited


async def test_stored_verdict_is_answered_without_fetching(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    spam = remote.serve(_event(remote, room_id, "10", SPAM, "mallory"), "10")
    first = await checker.check(caller, {"event_id": spam})
    assert first.status_code == 400
    assert remote.fetches == 1
    remote.events.clear()  # the server forgets it: only the stored verdict can answer
    again = await checker.check(caller, {"event_id": spam})
    assert (again.status_code, again.json()) == (400, first.json())
    assert remote.fetches == 1


async def test_forged_or_unsigned_events_are_not_judged(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")

    altered = _event(remote, room_id, "10", "hello", "alice")
    altered_id = remote.serve(altered, "10")
    altered["content"]["body"] = "changed after signing"  # content hash no longer matches

    unsigned = _event(remote, room_id, "10", "hello", "bob")
    del unsigned["signatures"][remote.name]
    unsigned_id = remote.serve(unsigned, "10")

    impostor = Origin(name=remote.name)  # same server name, another key
    forged = impostor.event(room_id, "10", body="hello", sender=f"@carol:{remote.name}")
    forged["signatures"] = {
        remote.name: {remote.origin.key_id: forged["signatures"][remote.name][impostor.key_id]}
    }
    forged_id = remote.serve(forged, "10")

    before = _answers("bad_signature")
    for event_id in (altered_id, unsigned_id, forged_id):
        r = await checker.check(caller, {"event_id": event_id})
        assert r.status_code == 404, r.text
        assert r.json()["errcode"] == "M_NOT_FOUND"
        assert "verified" in r.json()["error"]
        assert await get_verdict(pg_pool, event_id) is None  # nothing judged
    assert _answers("bad_signature") - before == 2


async def test_event_served_for_another_id_is_not_judged(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    real = _event(remote, room_id, "10", "hello", "alice")
    other = _event(remote, room_id, "10", SPAM, "mallory")
    asked = remote.serve(real, "10")
    remote.events[asked] = other  # a genuine event, but not the one asked for
    r = await checker.check(caller, {"event_id": asked})
    assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
    assert await get_verdict(pg_pool, asked) is None


async def test_first_verified_copy_wins(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    genuine = await start_server()
    liar = await start_server()
    checker = await make_checker([liar.name, genuine.name])
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    event = _event(genuine, room_id, "10", "hello", "alice")
    event_id = genuine.serve(event, "10")
    tampered = copy.deepcopy(event)
    tampered["content"]["body"] = SPAM
    liar.events[event_id] = tampered
    r = await checker.check(caller, {"event_id": event_id})
    assert (r.status_code, r.json()) == (200, {})
    stored = await get_verdict(pg_pool, event_id)
    assert stored is not None and stored.origin == genuine.name


async def test_events_of_other_communities_rooms_are_refused(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    mine, theirs = await new_caller(), await new_caller()
    their_room = await _protected_room(pg_pool, theirs, "10")
    unprotected = new_room_id("10")
    in_theirs = remote.serve(_event(remote, their_room, "10", SPAM, "mallory"), "10")
    in_none = remote.serve(_event(remote, unprotected, "10", "hi", "alice"), "10")

    answers = []
    for event_id in (in_theirs, in_none):
        r = await checker.check(mine, {"event_id": event_id})
        assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
        answers.append(r.json())
        assert await get_verdict(pg_pool, event_id) is None
    # The same answer for another community's room as for an unprotected one.
    assert answers[0] == answers[1]
    # Their own check judges it; afterwards the stored verdict is still not ours to see.
    r = await checker.check(theirs, {"event_id": in_theirs})
    assert r.status_code == 400 and r.json()["errcode"] == "M_FORBIDDEN"
    fetches = remote.fetches
    r = await checker.check(mine, {"event_id": in_theirs})
    assert (r.status_code, r.json()) == (404, answers[0])
    assert remote.fetches == fetches


async def test_unreachable_or_silent_servers_give_a_bounded_matrix_error(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    silent = await start_server()
    silent.hang = True
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    checker = await make_checker(
        [closed, silent.name],
        event_fetch_timeout_seconds=0.5,
        event_fetch_total_timeout_seconds=1.0,
    )
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    event_id = silent.serve(_event(silent, room_id, "10", "hello", "alice"), "10")
    r = await asyncio.wait_for(checker.check(caller, {"event_id": event_id}), 30)
    assert r.status_code == 503, r.text
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert r.headers["Retry-After"].isdigit()
    assert silent.fetches == 1


async def test_total_timeout_bounds_the_whole_fetch(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    silent = await start_server()
    silent.hang = True
    # The per-server bound alone would wait 20 s; the total bound ends it first.
    checker = await make_checker(
        [silent.name], event_fetch_timeout_seconds=20.0, event_fetch_total_timeout_seconds=0.5
    )
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    event_id = silent.serve(_event(silent, room_id, "10", "hello", "alice"), "10")
    before = _answers("timeout")
    r = await asyncio.wait_for(checker.check(caller, {"event_id": event_id}), 15)
    assert r.status_code == 503, r.text
    assert _answers("timeout") - before == 1


async def test_oversized_answers_are_not_read(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    remote.padding = 8192
    checker = await make_checker([remote.name], event_fetch_max_response_bytes=4096)
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    event_id = remote.serve(_event(remote, room_id, "10", "hello", "alice"), "10")
    before = _answers("too_large")
    r = await checker.check(caller, {"event_id": event_id})
    assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
    assert _answers("too_large") - before == 1
    remote.padding = 0  # the same event in a small answer is judged
    r = await checker.check(caller, {"event_id": event_id})
    assert (r.status_code, r.json()) == (200, {})


async def test_unknown_event_and_no_servers(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
) -> None:
    remote = await start_server()
    caller = await new_caller()
    checker = await make_checker([remote.name])
    r = await checker.check(caller, {"event_id": "$nobody-has-this"})
    assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
    assert remote.fetches == 1
    none = await make_checker([])
    r = await none.check(caller, {"event_id": "$nobody-has-this"})
    assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
    assert "PS_EVENT_FETCH_SERVERS" in r.json()["error"]
    assert remote.fetches == 1


@pytest.mark.parametrize(
    ("body", "status", "errcode"),
    [
        (b"{not json", 400, "M_NOT_JSON"),
        (b"", 400, "M_NOT_JSON"),
        (b"[]", 400, "M_BAD_JSON"),
        (b"{}", 400, "M_BAD_JSON"),
        (b'{"event_id": 5}', 400, "M_BAD_JSON"),
        (b'{"event_id": "no-dollar"}', 400, "M_BAD_JSON"),
        (b'{"event_id": "$"}', 400, "M_BAD_JSON"),
        (b'{"event_id": "$a b"}', 400, "M_BAD_JSON"),
        (b'{"event_id": "$a\\u0000"}', 400, "M_BAD_JSON"),
        (orjson.dumps({"event_id": "$" + "a" * 300}), 400, "M_BAD_JSON"),
        (orjson.dumps({"event_id": "$a", "pad": "x" * 5000}), 413, "M_TOO_LARGE"),
    ],
)
async def test_bad_bodies_get_matrix_errors(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    body: bytes,
    status: int,
    errcode: str,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    caller = await new_caller()
    r = await checker.check(caller, body)
    assert (r.status_code, r.json()["errcode"]) == (status, errcode), r.text
    assert remote.fetches == 0


async def test_requests_need_a_community_token(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name])
    r = await checker.check(None, {"event_id": "$x"})
    assert (r.status_code, r.json()["errcode"]) == (401, "M_MISSING_TOKEN")
    r = await checker.check(Caller("nobody", "pst_" + secrets.token_urlsafe(32)), b"{not json")
    assert (r.status_code, r.json()["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    r = await checker.client.get(CHECK_EVENT_ID_PATH)
    assert (r.status_code, r.json()["errcode"]) == (405, "M_UNRECOGNIZED")
    assert remote.fetches == 0


async def test_gateway_process_serves_the_route(
    spawn_service: Callable[..., ServiceProcess],
    new_caller: Callable[[], Awaitable[Caller]],
) -> None:
    """``warden gateway`` wires the route with the community bearer lookup."""
    caller = await new_caller()
    gateway = spawn_service("gateway", PS_EVENT_FETCH_SERVERS="")
    await asyncio.to_thread(gateway.wait_ready)
    async with httpx.AsyncClient(base_url=str(gateway.api_url), timeout=30) as client:
        r = await client.post(CHECK_EVENT_ID_PATH, json={"event_id": "$x"})
        assert (r.status_code, r.json()["errcode"]) == (401, "M_MISSING_TOKEN")
        r = await client.post(
            CHECK_EVENT_ID_PATH,
            json={"event_id": "$x"},
            headers={"Authorization": f"Bearer {caller.token}"},
        )
        assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
        assert "PS_EVENT_FETCH_SERVERS" in r.json()["error"]
    assert gateway.stop() == 0


@pytest.mark.parametrize("value", ["not a server!", "matrix.org,https://x"])
def test_event_fetch_servers_must_be_server_names(
    make_settings: Callable[..., Settings], value: str
) -> None:
    with pytest.raises(ValueError, match="is not a server name"):
        make_settings(event_fetch_servers=value)
    assert make_settings(event_fetch_servers="a.example, b.example:8448").event_fetch_servers == [
        "a.example",
        "b.example:8448",
    ]


async def test_fetches_in_flight_are_bounded(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    """With one slot, a silent server holds it: the server that has the event is never
    asked before the total timeout ends the check."""
    silent = await start_server()
    silent.hang = True
    genuine = await start_server()
    checker = await make_checker(
        [silent.name, genuine.name],
        event_fetch_concurrency=1,
        event_fetch_timeout_seconds=20.0,
        event_fetch_total_timeout_seconds=1.0,
    )
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    event_id = genuine.serve(_event(genuine, room_id, "10", "hello", "alice"), "10")
    r = await asyncio.wait_for(checker.check(caller, {"event_id": event_id}), 15)
    assert r.status_code == 503, r.text
    assert (silent.fetches, genuine.fetches) == (1, 0)
    # Two slots: both are asked and the genuine copy is judged.
    wide = await make_checker(
        [silent.name, genuine.name],
        event_fetch_concurrency=2,
        event_fetch_timeout_seconds=20.0,
        event_fetch_total_timeout_seconds=10.0,
    )
    r = await asyncio.wait_for(wide.check(caller, {"event_id": event_id}), 30)
    assert (r.status_code, r.json()) == (200, {})


async def test_events_larger_than_a_pdu_are_not_judged(
    start_server: Callable[..., Awaitable[EventServer]],
    make_checker: Callable[..., Awaitable[Checker]],
    new_caller: Callable[[], Awaitable[Caller]],
    pg_pool: asyncpg.Pool,
) -> None:
    remote = await start_server()
    checker = await make_checker([remote.name], max_pdu_bytes=1024)
    caller = await new_caller()
    room_id = await _protected_room(pg_pool, caller, "10")
    event_id = remote.serve(_event(remote, room_id, "10", "x" * 2000, "alice"), "10")
    before = _answers("too_large")
    r = await checker.check(caller, {"event_id": event_id})
    assert (r.status_code, r.json()["errcode"]) == (404, "M_NOT_FOUND")
    assert _answers("too_large") - before == 1
    assert await get_verdict(pg_pool, event_id) is None

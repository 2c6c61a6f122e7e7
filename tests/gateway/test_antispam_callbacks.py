"""``/_warden/antispam/v1``: synapse-http-antispam's callbacks judged by the real filter
worker services (evaluation, text checks, antispam checks) over NATS, with real
PostgreSQL and Redis; the homeserver is a community holding a token."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from unpaddedbase64 import encode_base64

from tests.gateway.real_worker import real_worker  # noqa: F401
from tests.gateway.test_policy_list_glob_bounded import rule
from warden.bus.subjects import ANTISPAM_CHECK_SUBJECT, CHECK_TEXT_SUBJECT
from warden.filters.base import FilterDeps
from warden.policy.config import instance_defaults
from warden.policy.harms import HARMS_FIELD, OTHER, SPAM
from warden.storage import communities, community_tokens, room_state, rooms
from warden.storage.verdicts import get_verdict
from warden_filter_worker.antispam_checks import (
    AntispamCheckService,
    event_filters,
    username_filters,
)
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.text_checks import TextCheckService
from warden_gateway.antispam import PING_PATH, PREFIX, AntispamAPI
from warden_gateway.community_auth import CommunityAuth
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.verdict_source import VerdictSource

Client = Callable[..., Awaitable[httpx.AsyncClient]]
HS = "hs.example"


def room_id() -> str:
    return "!" + encode_base64(os.urandom(18), urlsafe=True) + ":" + HS


def event_id() -> str:
    return "$" + encode_base64(os.urandom(32), urlsafe=True)


def message(body: str, sender: str = f"@alice:{HS}") -> dict[str, Any]:
    """A local message as synapse-http-antispam sends it (client format + event_id)."""
    return {
        "type": "m.room.message",
        "sender": sender,
        "room_id": room_id(),
        "event_id": event_id(),
        "origin_server_ts": 1_700_000_000_000,
        "content": {"msgtype": "m.text", "body": body},
        "unsigned": {"age": 5},
    }


def counter(callback: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "warden_antispam_callbacks_total", {"callback": callback, "outcome": outcome}
    )
    return value or 0.0


@pytest.fixture
def subjects() -> tuple[str, str]:
    """Antispam and text subjects private to this test."""
    tag = uuid.uuid4().hex[:12]
    return f"{ANTISPAM_CHECK_SUBJECT}.test{tag}", f"{CHECK_TEXT_SUBJECT}.test{tag}"


@pytest.fixture
async def workers(
    real_worker: EvaluationService,  # noqa: F811
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    subjects: tuple[str, str],
) -> AsyncIterator[None]:
    """The worker's antispam and text check services, in process (besides evaluation)."""
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id="@warden:gateway.test")
    configs = CommunityConfigCache(pg_pool, instance_defaults({}))
    antispam = AntispamCheckService(deps=deps, configs=configs, timeout_seconds=1.0)
    text = TextCheckService(deps=deps, configs=configs, timeout_seconds=1.0)
    await antispam.start(nats_client, subjects[0])
    await text.start(nats_client, subjects[1])
    yield
    await antispam.stop()
    await text.stop()


@pytest.fixture
async def make_client(
    pg_pool: asyncpg.Pool, nats_client: NATS, evaluate_subject: str, subjects: tuple[str, str]
) -> AsyncIterator[Client]:
    """``await make_client(token=...)``: an HTTP client on an app serving the routes."""
    clients: list[httpx.AsyncClient] = []

    async def make(
        *, token: str | None = None, evaluate: str | None = None, check: str | None = None
    ) -> httpx.AsyncClient:
        api = AntispamAPI(
            auth=CommunityAuth(pg_pool, rate_limiter=None, failures_per_minute=100),
            nats=nats_client,
            verdicts=VerdictSource(
                nats_client, timeout_seconds=2.0, subject=evaluate or evaluate_subject
            ),
            max_body_bytes=4096,
            timeout_seconds=2.0,
            check_subject=check or subjects[0],
            text_subject=subjects[1],
        )
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=Starlette(routes=api.routes())),
            base_url="http://warden",
            headers=headers,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def homeserver(pool: asyncpg.Pool, config: dict[str, Any] | None = None) -> tuple[str, str]:
    """A community standing for a homeserver; returns its ID and token."""
    community = await communities.create_community(pool, f"HS {uuid.uuid4().hex[:6]}")
    if config is not None:
        await communities.update_community(pool, community.community_id, config=config)
    rotation = await community_tokens.rotate_access_token(pool, community.community_id)
    assert rotation is not None
    return community.community_id, rotation.new_access_token


def assert_error(r: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["errcode"] == errcode and isinstance(body["error"], str), body
    return body


async def test_check_event_for_spam_refuses_a_keyword_and_stores_the_verdict(
    workers: None, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    community_id, token = await homeserver(pg_pool, {"keyword_filter_keywords": ["buy now"]})
    client = await make_client(token=token)
    refused_before = counter("check_event_for_spam", "refused")

    ok = message("hello there")
    r = await client.post(f"{PREFIX}/check_event_for_spam", json={"event": ok})
    assert r.status_code == 200 and r.json() == {}, r.text

    spam = message("please buy now")
    r = await client.post(f"{PREFIX}/check_event_for_spam", json={"event": spam})
    body = assert_error(r, 403, "M_FORBIDDEN")
    assert body["harms"] == body[HARMS_FIELD] == [SPAM]
    assert counter("check_event_for_spam", "refused") == refused_before + 1

    # Recorded like a /sign verdict, under a key of the homeserver's own.
    stored = await get_verdict(pg_pool, f"antispam:{community_id}:{spam['event_id']}")
    assert stored is not None and stored.prohibited and list(stored.harms) == [SPAM]
    assert stored.room_id == spam["room_id"] and stored.origin == HS
    # Never the verdict of the event ID itself (which /sign would answer from).
    assert await get_verdict(pg_pool, spam["event_id"]) is None

    # Asked again (another unsigned): the stored verdict answers.
    spam["unsigned"] = {"age": 99}
    r = await client.post(f"{PREFIX}/check_event_for_spam", json={"event": spam})
    assert assert_error(r, 403, "M_FORBIDDEN")["harms"] == [SPAM]
    # As on /sign, a room can always change its policy server, whatever the content.
    policy = {**message("buy now"), "type": "m.room.policy", "state_key": ""}
    r = await client.post(f"{PREFIX}/check_event_for_spam", json={"event": policy})
    assert r.status_code == 200, r.text
    # The same event ID with other content is never "not spam".
    spam["content"] = {"msgtype": "m.text", "body": "innocent"}
    r = await client.post(f"{PREFIX}/check_event_for_spam", json={"event": spam})
    assert_error(r, 403, "M_FORBIDDEN")


async def test_invites_joins_and_publishing_follow_the_policy_lists(
    workers: None, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    list_room = room_id()
    community_id, token = await homeserver(pg_pool, {"policy_list_room_ids": [list_room]})
    await rooms.put_room(pg_pool, list_room, "12", community_id)
    for key, entity in (("u", "@spammer:*"), ("s", "evil.example")):
        ban = rule(entity, key)
        if key == "s":
            ban["type"] = "m.policy.rule.server"
        await room_state.apply_event(pg_pool, list_room, ban, f"${key}{uuid.uuid4().hex}")
    client = await make_client(token=token)
    room = room_id().partition(":")[0]  # room version 12: no server name

    async def call(callback: str, body: dict[str, Any]) -> httpx.Response:
        return await client.post(f"{PREFIX}/{callback}", json=body)

    invite = {"inviter": f"@alice:{HS}", "invitee": f"@bob:{HS}", "room_id": room}
    assert (await call("user_may_invite", invite)).status_code == 200
    body = assert_error(
        await call("user_may_invite", {**invite, "inviter": f"@spammer:{HS}"}), 403, "M_FORBIDDEN"
    )
    assert body["harms"] == body[HARMS_FIELD] == [OTHER]
    assert_error(
        await call("user_may_invite", {**invite, "invitee": "@spammer:other.example"}),
        403,
        "M_FORBIDDEN",
    )

    federated = {
        "type": "m.room.member",
        "sender": "@x:evil.example",
        "state_key": f"@bob:{HS}",
        "room_id": room,
        "event_id": event_id(),
        "content": {"membership": "invite"},
    }
    assert_error(await call("federated_user_may_invite", {"event": federated}), 403, "M_FORBIDDEN")
    federated = {**federated, "sender": "@x:good.example", "event_id": event_id()}
    assert (await call("federated_user_may_invite", {"event": federated})).status_code == 200

    join = {"user": "@anyone:good.example", "room": room, "is_invited": False}
    assert (await call("user_may_join_room", join)).status_code == 200
    assert_error(
        await call("user_may_join_room", {**join, "user": "@anyone:evil.example"}),
        403,
        "M_FORBIDDEN",
    )

    for callback, ok, banned in (
        ("user_may_create_room", {"user_id": f"@alice:{HS}"}, {"user_id": f"@spammer:{HS}"}),
        (
            "user_may_publish_room",
            {"user_id": f"@alice:{HS}", "room_id": room},
            {"user_id": f"@spammer:{HS}", "room_id": room},
        ),
        (
            "check_login_for_spam",
            {"user_id": f"@alice:{HS}", "device_id": "D", "request_info": []},
            {"user_id": f"@spammer:{HS}", "device_id": "D", "request_info": []},
        ),
        (
            "user_may_send_3pid_invite",
            {"inviter": f"@alice:{HS}", "medium": "email", "address": "a@b.c", "room_id": room},
            {"inviter": f"@spammer:{HS}", "medium": "email", "address": "a@b.c", "room_id": room},
        ),
    ):
        r = await call(callback, ok)
        assert r.status_code == 200, (callback, r.text)
        assert_error(await call(callback, banned), 403, "M_FORBIDDEN")


def state_event(event_type: str, content: dict[str, Any]) -> dict[str, Any]:
    """A room state event as the room-state consumer would learn it."""
    return {
        "type": event_type,
        "state_key": "",
        "sender": f"@mod:{HS}",
        "content": content,
        "origin_server_ts": 1,
        "depth": 7,
        "auth_events": [],
        "prev_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }


async def test_publishing_judges_the_rooms_learned_name_and_topic(
    workers: None, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    list_room = room_id()
    community_id, token = await homeserver(
        pg_pool, {"keyword_filter_keywords": ["casino"], "policy_list_room_ids": [list_room]}
    )
    await rooms.put_room(pg_pool, list_room, "12", community_id)
    await room_state.apply_event(pg_pool, list_room, rule("@spammer:*", "u"), event_id())
    client = await make_client(token=token)

    async def learned(name: Any = None, topic: Any = None) -> str:
        room = room_id()
        for event_type, field, value in (
            ("m.room.name", "name", name),
            ("m.room.topic", "topic", topic),
        ):
            if value is not None:
                ev = state_event(event_type, {field: value})
                assert await room_state.apply_event(pg_pool, room, ev, event_id()) is not None
        return room

    async def publish(room: str, user: str = f"@alice:{HS}") -> httpx.Response:
        return await client.post(
            f"{PREFIX}/user_may_publish_room", json={"user_id": user, "room_id": room}
        )

    refused_before = (
        REGISTRY.get_sample_value(
            "warden_antispam_checks_total", {"kind": "publish_room", "outcome": "refused"}
        )
        or 0.0
    )
    assert await room_state.get_name_and_topic(pg_pool, await learned("a", "b")) == ("a", "b")
    fine = await learned("Friends", "we talk about gardens")
    assert (await publish(fine)).status_code == 200
    # The name, or the topic, with a keyword of the community: refused as spam.
    body = assert_error(await publish(await learned("casino night")), 403, "M_FORBIDDEN")
    assert body["harms"] == body[HARMS_FIELD] == [SPAM]
    body = assert_error(
        await publish(await learned("Friends", "the best casino in town")), 403, "M_FORBIDDEN"
    )
    assert body["harms"] == [SPAM]
    assert (
        REGISTRY.get_sample_value(
            "warden_antispam_checks_total", {"kind": "publish_room", "outcome": "refused"}
        )
        == refused_before + 2
    )
    # Not strings (a malformed event): nothing to judge. No learned state: the same.
    assert (await publish(await learned({"x": "casino"}, ["casino"]))).status_code == 200
    assert (await publish(room_id())).status_code == 200
    # The publisher's bans still come first.
    assert_error(await publish(fine, f"@spammer:{HS}"), 403, "M_FORBIDDEN")


async def test_invite_rate_counts_each_invite(
    workers: None, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    _, token = await homeserver(pg_pool, {"invite_rate_filter_max_invites_per_minute": 2})
    client = await make_client(token=token)
    room = room_id()
    statuses = [
        (
            await client.post(
                f"{PREFIX}/user_may_invite",
                json={"inviter": f"@alice:{HS}", "invitee": f"@u{n}:{HS}", "room_id": room},
            )
        ).status_code
        for n in range(3)
    ]
    assert statuses == [200, 200, 403]


async def test_aliases_and_user_names_go_through_the_text_filters(
    workers: None, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    _, token = await homeserver(
        pg_pool,
        {"keyword_filter_keywords": ["casino"], "user_id_contains_words_filter_max_words": 3},
    )
    client = await make_client(token=token)
    alias = {"user_id": f"@alice:{HS}", "room_alias": f"#friends:{HS}"}
    r = await client.post(f"{PREFIX}/user_may_create_room_alias", json=alias)
    assert r.status_code == 200, r.text
    r = await client.post(
        f"{PREFIX}/user_may_create_room_alias", json={**alias, "room_alias": f"#casino:{HS}"}
    )
    assert assert_error(r, 403, "M_FORBIDDEN")["harms"] == [SPAM]

    async def username(user_id: str, display_name: str | None) -> httpx.Response:
        profile = {"user_id": user_id, "display_name": display_name, "avatar_url": None}
        return await client.post(
            f"{PREFIX}/check_username_for_spam",
            json={"user_profile": profile, "requester_id": f"@alice:{HS}"},
        )

    assert (await username(f"@bob:{HS}", "Bob")).status_code == 200
    assert (await username(f"@bob:{HS}", None)).status_code == 200
    assert_error(await username(f"@bob:{HS}", "the casino bob"), 403, "M_FORBIDDEN")
    assert_error(await username(f"@buy.cheap_pills-now:{HS}", "x"), 403, "M_FORBIDDEN")


def test_user_names_skip_rate_and_list_filters() -> None:
    names = {f.name for f in username_filters()}
    assert {"keyword", "user_id_length", "user_id_contains_words"} <= names
    assert not names & {"frequency", "invite_rate", "join_rate", "policy_list"}
    # A refused action does not hellban whoever attempted it; a hellbanned user is
    # still refused.
    events = {f.name for f in event_filters()}
    assert "hellban_postfilter" not in events and "hellban_prefilter" in events


async def test_tokens_ping_bad_bodies_and_no_workers(
    workers: None, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    path = f"{PREFIX}/check_event_for_spam"
    anonymous = await make_client()
    assert_error(await anonymous.post(path, json={"event": message("x")}), 401, "M_MISSING_TOKEN")
    assert_error(await anonymous.post(PING_PATH, json={"id": "a"}), 401, "M_MISSING_TOKEN")
    wrong = await make_client(token="pst_" + "x" * 43)
    assert_error(await wrong.post(path, json={"event": message("x")}), 401, "M_UNKNOWN_TOKEN")

    _, token = await homeserver(pg_pool)
    client = await make_client(token=token)
    r = await client.post(PING_PATH, json={"id": "abcdefgh"})
    assert r.status_code == 200 and r.json() == {"id": "abcdefgh", "status": "ok"}
    assert_error(await client.post(PING_PATH, json={}), 400, "M_BAD_JSON")

    assert_error(await client.post(path, content=b"{"), 400, "M_NOT_JSON")
    assert_error(await client.post(path, json=[]), 400, "M_BAD_JSON")
    assert_error(await client.post(path, json={"event": "x"}), 400, "M_BAD_JSON")
    no_id = message("x")
    del no_id["event_id"]
    assert_error(await client.post(path, json={"event": no_id}), 400, "M_BAD_JSON")
    assert_error(await client.post(path, content=b"x" * 5000), 413, "M_TOO_LARGE")
    assert_error(
        await client.post(f"{PREFIX}/user_may_invite", json={"inviter": "bob"}), 400, "M_BAD_JSON"
    )
    assert_error(await client.post(f"{PREFIX}/no_such_callback", json={}), 404, "M_UNRECOGNIZED")
    r = await client.post(f"{PREFIX}/accept_make_join", json={"user": "@a:b", "room": "!r:b"})
    assert r.status_code == 200, r.text

    # No worker serves the subjects: 503 in plain text (the module's fail_open applies).
    nobody = f"nobody.{uuid.uuid4().hex}"
    dead = await make_client(token=token, evaluate=nobody, check=nobody)
    before = counter("check_event_for_spam", "unavailable")
    r = await dead.post(path, json={"event": message("hi")})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert not r.headers["content-type"].startswith("application/json")
    assert counter("check_event_for_spam", "unavailable") == before + 1
    r = await dead.post(
        f"{PREFIX}/user_may_join_room", json={"user": "@a:b", "room": "!r:b", "is_invited": True}
    )
    assert r.status_code == 503


async def test_callbacks_have_a_rate_budget_of_their_own(
    pg_pool: asyncpg.Pool, nats_client: NATS, redis_client: aioredis.Redis
) -> None:
    """A homeserver asks once per message: the callbacks do not spend the server-centric
    API's budget (here 1 a minute), and have their own (PS_ANTISPAM_RATE_LIMIT_PER_MINUTE;
    none by default)."""
    _, token = await homeserver(pg_pool)
    community_api = OriginRateLimiter(redis_client, 1, 60, budget=f"ca{uuid.uuid4().hex[:6]}")
    antispam_budget = OriginRateLimiter(redis_client, 3, 60, budget=f"as{uuid.uuid4().hex[:6]}")
    auth = CommunityAuth(pg_pool, rate_limiter=community_api, failures_per_minute=100)

    def client(limiter: OriginRateLimiter | None) -> httpx.AsyncClient:
        api = AntispamAPI(
            auth=auth,
            nats=nats_client,
            verdicts=VerdictSource(nats_client, timeout_seconds=1.0),
            max_body_bytes=4096,
            timeout_seconds=1.0,
            rate_limiter=limiter,
        )
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=Starlette(routes=api.routes())),
            base_url="http://warden",
            headers={"Authorization": f"Bearer {token}"},
        )

    try:
        async with client(None) as unlimited:
            for i in range(6):
                r = await unlimited.post(PING_PATH, json={"id": f"u{i}"})
                assert r.status_code == 200, r.text
        async with client(antispam_budget) as limited:
            for i in range(3):
                r = await limited.post(PING_PATH, json={"id": f"l{i}"})
                assert r.status_code == 200, r.text
            assert_error(
                await limited.post(PING_PATH, json={"id": "over"}), 429, "M_LIMIT_EXCEEDED"
            )
    finally:
        await community_api.aclose()
        await antispam_budget.aclose()

"""``POST /_policyserv/v1/check/text``: community tokens, the text check on a real filter
worker service over NATS, rate limits and errors (real PostgreSQL, Redis and NATS)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from starlette.applications import Starlette

from warden.bus.subjects import CHECK_TEXT_SUBJECT
from warden.filters.base import FilterDeps
from warden.policy.config import instance_defaults
from warden.policy.harms import HARMS_FIELD, SPAM, SPAM_FLOODING
from warden.storage import communities, community_tokens
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.text_checks import TextCheckService, text_filters
from warden_gateway.community_auth import CommunityAuth
from warden_gateway.rate_limit import OriginRateLimiter
from warden_gateway.server_centric import CHECK_TEXT_PATH, ServerCentricAPI

Client = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
def text_subject() -> str:
    """A NATS subject private to this test."""
    return f"{CHECK_TEXT_SUBJECT}.test{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def text_worker(
    redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, nats_client: NATS, text_subject: str
) -> AsyncIterator[TextCheckService]:
    """The filter worker's text check service, in process, on this test's subject."""
    deps = FilterDeps(redis=redis_client, pool=pg_pool, local_user_id="@warden:gateway.test")
    service = TextCheckService(
        deps=deps,
        configs=CommunityConfigCache(pg_pool, instance_defaults({})),
        timeout_seconds=1.0,
    )
    await service.start(nats_client, text_subject)
    yield service
    await service.stop()


@pytest.fixture
async def make_client(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, nats_client: NATS, text_subject: str
) -> AsyncIterator[Client]:
    """``await make_client(rate_limit=..., failures=..., token=...)``: an HTTP client on
    an app serving the server-centric routes."""
    clients: list[httpx.AsyncClient] = []
    limiters: list[OriginRateLimiter] = []

    async def make(
        *, rate_limit: int = 0, failures: int = 100, token: str | None = None, **kw: Any
    ) -> httpx.AsyncClient:
        limiter = OriginRateLimiter(redis_client, rate_limit, 60, budget="community_api")
        limiters.append(limiter)
        api = ServerCentricAPI(
            auth=CommunityAuth(pg_pool, rate_limiter=limiter, failures_per_minute=failures),
            nats=nats_client,
            pool=pg_pool,
            joiner=None,
            max_text_bytes=kw.get("max_text_bytes", 1024),
            text_timeout_seconds=kw.get("timeout", 2.0),
            text_subject=kw.get("subject", text_subject),
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
    for limiter in limiters:
        await limiter.aclose()


async def new_community(pool: asyncpg.Pool, config: dict[str, Any] | None = None) -> str:
    """A community with a token; returns the token."""
    community = await communities.create_community(pool, f"Text {uuid.uuid4().hex[:6]}")
    if config is not None:
        await communities.update_community(pool, community.community_id, config=config)
    rotation = await community_tokens.rotate_access_token(pool, community.community_id)
    assert rotation is not None
    return rotation.new_access_token


def assert_error(r: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["errcode"] == errcode and isinstance(body["error"], str), body
    return body


def test_the_text_filters_are_those_marked_text_capable() -> None:
    names = {f.name for f in text_filters()}
    assert {"keyword", "density", "length", "trim_length", "many_ats"} <= names
    assert not names & {"hellban_prefilter", "hellban_postfilter", "frequency", "sender"}


async def test_allowed_and_refused_texts(
    text_worker: TextCheckService,
    make_client: Client,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await new_community(pg_pool, {"keyword_filter_keywords": ["buy now"]})
    client = await make_client(token=token)
    verdicts_before = await pg_pool.fetchval("SELECT count(*) FROM verdicts")

    r = await client.post(CHECK_TEXT_PATH, content=b"hello there")
    assert r.status_code == 200, r.text
    assert r.json() == {}

    r = await client.post(CHECK_TEXT_PATH, content="please buy now \u2603".encode())
    body = assert_error(r, 400, "ORG.MATRIX.MSC4387_SAFETY")
    assert body["harms"] == body[HARMS_FIELD] == [SPAM]

    # The community's own config decides: the instance default keywords ("spam") are
    # not in this community's list, and another community has its own.
    r = await client.post(CHECK_TEXT_PATH, content=b"spam")
    assert r.status_code == 200, r.text
    other = await make_client(token=await new_community(pg_pool))
    assert_error(
        await other.post(CHECK_TEXT_PATH, content=b"spam"), 400, "ORG.MATRIX.MSC4387_SAFETY"
    )

    # Length: the text is judged as a message body.
    flood = await make_client(
        token=await new_community(pg_pool, {"length_filter_max_length": 100}),
    )
    body = assert_error(
        await flood.post(CHECK_TEXT_PATH, content=b"word " * 40), 400, "ORG.MATRIX.MSC4387_SAFETY"
    )
    assert body["harms"] == [SPAM_FLOODING]

    # No side effect: no verdict stored, nothing in Redis, and the token never logged.
    assert await pg_pool.fetchval("SELECT count(*) FROM verdicts") == verdicts_before
    assert await redis_client.keys("*") == []  # no hellban, claim or cached verdict
    assert token not in caplog.text


async def test_missing_bad_and_rotated_tokens(
    text_worker: TextCheckService, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    anonymous = await make_client()
    assert_error(await anonymous.post(CHECK_TEXT_PATH, content=b"hi"), 401, "M_MISSING_TOKEN")
    basic = await make_client()
    r = await basic.post(CHECK_TEXT_PATH, content=b"hi", headers={"Authorization": "Basic abc"})
    assert_error(r, 401, "M_MISSING_TOKEN")
    wrong = await make_client(token="pst_" + "x" * 43)
    assert_error(await wrong.post(CHECK_TEXT_PATH, content=b"hi"), 401, "M_UNKNOWN_TOKEN")

    token = await new_community(pg_pool)
    client = await make_client(token=token)
    assert (await client.post(CHECK_TEXT_PATH, content=b"hi")).status_code == 200
    community_id = await pg_pool.fetchval(
        "SELECT id FROM communities WHERE api_access_token_hash = $1",
        communities.hash_access_token(token),
    )
    rotation = await community_tokens.rotate_access_token(pg_pool, community_id)
    assert rotation is not None
    # The old token dies at once; the new one works.
    assert_error(await client.post(CHECK_TEXT_PATH, content=b"hi"), 401, "M_UNKNOWN_TOKEN")
    fresh = await make_client(token=rotation.new_access_token)
    assert (await fresh.post(CHECK_TEXT_PATH, content=b"hi")).status_code == 200
    # Wrong method: a Matrix error too.
    r = await fresh.get(CHECK_TEXT_PATH)
    assert r.status_code == 405


async def test_bad_bodies_and_unreachable_workers(
    text_worker: TextCheckService, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    token = await new_community(pg_pool)
    client = await make_client(token=token, max_text_bytes=16)
    assert_error(await client.post(CHECK_TEXT_PATH, content=b"x" * 17), 413, "M_TOO_LARGE")
    assert_error(await client.post(CHECK_TEXT_PATH, content=b"\xff\xfe"), 400, "M_INVALID_PARAM")
    assert (await client.post(CHECK_TEXT_PATH, content=b"")).status_code == 200

    # Nobody serves the subject: 503 with Retry-After, not a hang or a 500.
    nobody = await make_client(
        token=token, subject=f"{CHECK_TEXT_SUBJECT}.nobody{uuid.uuid4().hex}"
    )
    r = await nobody.post(CHECK_TEXT_PATH, content=b"hi")
    assert_error(r, 503, "M_UNKNOWN")
    assert r.headers["retry-after"] == "1"


async def test_requests_are_limited_per_token(
    text_worker: TextCheckService, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    token = await new_community(pg_pool)
    other = await new_community(pg_pool)
    client = await make_client(token=token, rate_limit=3)
    for _ in range(3):
        assert (await client.post(CHECK_TEXT_PATH, content=b"hi")).status_code == 200
    r = await client.post(CHECK_TEXT_PATH, content=b"hi")
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    assert body["retry_after_ms"] > 0 and int(r.headers["retry-after"]) >= 1
    # Another community's token has its own budget (on the same limiter's app).
    r = await client.post(
        CHECK_TEXT_PATH, content=b"hi", headers={"Authorization": f"Bearer {other}"}
    )
    assert r.status_code == 200, r.text


async def test_failed_authentications_are_bounded_per_address(
    text_worker: TextCheckService, make_client: Client, pg_pool: asyncpg.Pool
) -> None:
    token = await new_community(pg_pool)
    client = await make_client(failures=2)
    bad = {"Authorization": "Bearer pst_guess"}
    for _ in range(2):
        assert_error(
            await client.post(CHECK_TEXT_PATH, content=b"hi", headers=bad), 401, "M_UNKNOWN_TOKEN"
        )
    # Past the bound even the right token waits out the minute.
    r = await client.post(
        CHECK_TEXT_PATH, content=b"hi", headers={"Authorization": f"Bearer {token}"}
    )
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    assert body["retry_after_ms"] > 0

"""M3: a refusal its sender's own server asked about first is redacted, once, when
another server asks about it (answered from the gateway's cache)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import REGISTRY

from tests.gateway.policy_harness import SIGN_PATH, Gateway, GatewayFactory, Origin, new_room_id
from tests.gateway.real_worker import real_worker  # noqa: F401
from tests.local_servers import start_threaded, stop_all
from tests.moderator.conftest import FakeClientAPI
from tests.moderator.verdict_stream import wait_for
from warden.bus.streams import ensure_verdicts_stream
from warden.bus.subjects import (
    MODERATION_REQUEST_SUBJECT,
    VERDICTS_STREAM,
    verdict_subject,
)
from warden.matrix.event_hashes import event_id_from_reference_hash, redacted_signing_bytes
from warden.matrix.room_versions import get_room_version
from warden.settings import Settings
from warden.storage import deliveries, rooms
from warden_filter_worker.evaluation import EvaluationService
from warden_gateway.moderation_requests import ModerationRequests
from warden_moderator.client_api import redaction_txn_id
from warden_moderator.service import ModeratorService

MODERATOR = "@mod:hs.test"
TOKEN = "syt_moderator_token"


@pytest.fixture
async def homeserver() -> AsyncIterator[tuple[FakeClientAPI, str]]:
    """The moderator's homeserver (Client-Server API stand-in on loopback)."""
    api = FakeClientAPI(tokens={TOKEN: MODERATOR})
    server = await start_threaded(api)
    yield api, server.base_url
    stop_all([server])


@pytest.fixture
async def moderator(
    homeserver: tuple[FakeClientAPI, str],
    make_settings: Callable[..., Settings],
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
) -> AsyncIterator[ModeratorService]:
    """The moderator service in process, on durable consumers of its own that start at
    new messages (what other tests left in the stream is not ours to redact)."""
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    durable = f"test-moderator-{uuid.uuid4().hex[:12]}"
    subjects = {
        durable: verdict_subject("prohibited"),
        f"{durable}-requests": MODERATION_REQUEST_SUBJECT,
    }
    for name, subject in subjects.items():
        await js.add_consumer(
            VERDICTS_STREAM,
            ConsumerConfig(
                durable_name=name,
                filter_subject=subject,
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
            ),
        )
    settings = make_settings(
        moderator_access_tokens=[f"{homeserver[1]}:{TOKEN}"],
        moderation_retry_base_seconds=0.05,
        moderation_timeout_seconds=5.0,
    )
    service = await ModeratorService.create(settings, pg_pool, js, durable=durable)
    stopping = asyncio.Event()
    task = asyncio.create_task(service.run(stopping))
    yield service
    stopping.set()
    await asyncio.wait_for(task, 30)
    await service.aclose()
    for name in subjects:
        with contextlib.suppress(Exception):
            await js.delete_consumer(VERDICTS_STREAM, name)


async def sign(gateway: Gateway, origin: Origin, event: dict[str, Any]) -> Any:
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


def event_id_of(event: dict[str, Any]) -> str:
    version = get_room_version("12")
    digest = hashlib.sha256(redacted_signing_bytes(version, event)).digest()
    return event_id_from_reference_hash(version, digest)


async def settled(js: Any, durable: str) -> bool:
    info = await js.consumer_info(VERDICTS_STREAM, durable)
    return bool(info.num_ack_pending == 0 and info.num_pending == 0)


async def test_spam_its_own_server_asked_about_first_is_redacted_once_another_asks(
    make_gateway: GatewayFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,  # noqa: F811
    moderator: ModeratorService,
    homeserver: tuple[FakeClientAPI, str],
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
) -> None:
    api = homeserver[0]
    js = nats_client.jetstream()
    gateway = await make_gateway(moderation=ModerationRequests(js))
    spammers, bystander, third = await start_origin(), await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("12"), "12")
    await rooms.set_moderator(pg_pool, room_id, MODERATOR)
    spam = spammers.event(room_id, "12", body="buy spam now")

    # The spammer's own server asks first: refused, and (rightly) not redacted.
    r = await sign(gateway, spammers, spam)
    assert r.status_code == 400 and r.json()["errcode"] == "M_FORBIDDEN"
    await wait_for(lambda: settled(js, moderator.consumer.durable), "the verdict handled")
    assert api.requests == []

    # The spammer sent it on to another server, which asks: refused from the cache, and
    # now the moderator redacts it. More asks change nothing.
    event_id = event_id_of(spam)
    assert gateway.verdicts.cached(event_id) is not None  # answered from the cache
    for asker in (bystander, third, bystander):
        r = await sign(gateway, asker, spam)
        assert r.status_code == 400 and r.json()["errcode"] == "M_FORBIDDEN"

    await wait_for(lambda: len(api.requests) >= 1, "the redaction")
    assert moderator.requests is not None
    await wait_for(lambda: settled(js, moderator.requests.durable), "the requests handled")
    assert len(api.requests) == 1
    assert api.requests[0].event_id == event_id
    assert list(api.redactions) == [(TOKEN, redaction_txn_id(event_id))]
    record = await deliveries.get_moderation_action(pg_pool, event_id)
    assert record is not None and record.status == "done"


def requests_published() -> float:
    value = REGISTRY.get_sample_value("warden_moderation_requests_total", {"outcome": "published"})
    return value or 0.0


async def test_another_replica_answering_from_the_workers_cache_requests_it_too(
    make_gateway: GatewayFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,  # noqa: F811
    moderator: ModeratorService,
    homeserver: tuple[FakeClientAPI, str],
    nats_client: NATS,
    pg_pool: asyncpg.Pool,
) -> None:
    """The other server's ask reaches a replica that never saw the event: its verdict
    comes from the worker (Redis), and the moderation request is made all the same."""
    api = homeserver[0]
    js = nats_client.jetstream()
    first = await make_gateway(moderation=ModerationRequests(js))
    second = await make_gateway(moderation=ModerationRequests(js))
    spammers, bystander = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("12"), "12")
    await rooms.set_moderator(pg_pool, room_id, MODERATOR)
    spam = spammers.event(room_id, "12", body="buy spam today")

    assert (await sign(first, spammers, spam)).status_code == 400
    assert second.verdicts.cached(event_id_of(spam)) is None
    assert (await sign(second, bystander, spam)).status_code == 400

    await wait_for(lambda: len(api.requests) >= 1, "the redaction")
    assert [r.event_id for r in api.requests] == [event_id_of(spam)]


async def test_no_request_when_the_first_asker_was_not_the_senders_server(
    make_gateway: GatewayFactory,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    real_worker: EvaluationService,  # noqa: F811
    nats_client: NATS,
) -> None:
    """The verdict itself already makes the moderator act; no second message."""
    moderation = ModerationRequests(nats_client.jetstream())
    gateway = await make_gateway(moderation=moderation)
    spammers, bystander = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("12"), "12")
    spam = spammers.event(room_id, "12", body="buy spam again")
    before = requests_published()

    for asker in (bystander, spammers, bystander):
        assert (await sign(gateway, asker, spam)).status_code == 400

    assert moderation.requested == 0  # none made, none in flight
    assert requests_published() == before


async def test_requests_are_bounded_and_made_once(nats_client: NATS) -> None:
    js = nats_client.jetstream()
    await ensure_verdicts_stream(js)
    moderation = ModerationRequests(js, remembered=2, max_pending=1)
    dropped = REGISTRY.get_sample_value("warden_moderation_requests_total", {"outcome": "dropped"})
    ids = [f"${uuid.uuid4().hex}" for _ in range(3)]

    for event_id in ids:
        moderation.request(event_id, "other.test")  # one in flight at most
    await moderation.aclose()
    assert moderation.requested == 1
    after = REGISTRY.get_sample_value("warden_moderation_requests_total", {"outcome": "dropped"})
    assert (after or 0) - (dropped or 0) == 2

    for event_id in ids:  # one at a time now; only two remembered
        moderation.request(event_id, "other.test")
        await moderation.aclose()
    assert moderation.requested == 2
    published_before = requests_published()
    moderation.request(ids[-1], "third.test")  # remembered: not again
    await moderation.aclose()
    assert requests_published() == published_before

"""Only what is signed decides (issue 10; review H5, H2, L4), black-box: the gateway app
asked over HTTP by origin homeservers with real HTTPS key servers, answered by the real
filter-worker evaluation service and pipeline (default community configuration), on
real NATS, Redis and PostgreSQL.

* H5: bytes no hash or signature covers (``unsigned``, ``signatures``) cannot change a
  verdict, so whoever asks first cannot get someone else's event refused.
* H2: a third-party invite that the named sender's server did not sign, and that the
  room's ``m.room.third_party_invite`` does not vouch for, is judged without any side
  effect on the named sender, and its verdict says so.
* L4: a room v1/v2 event ID that would not survive use as a NATS header or key is
  refused with 400 ``M_BAD_JSON``.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import nacl.signing
import orjson
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import SIGN_PATH, Gateway, Origin, new_room_id
from tests.gateway.test_policy_check import post_check
from warden import redis_keys
from warden.bus.streams import ensure_verdicts_stream
from warden.filters.base import FilterDeps
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.event_signing import sign_event
from warden.matrix.room_versions import get_room_version
from warden.policy.config import instance_defaults
from warden.policy.harms import HARMS_FIELD
from warden.policy.pipeline import Pipeline
from warden.policy.verdict import SENDER_UNVERIFIED, Verdict
from warden.storage.room_state import apply_event
from warden.storage.verdicts import get_verdict
from warden_filter_worker.community_config import CommunityConfigCache
from warden_filter_worker.evaluation import EvaluationService
from warden_filter_worker.group_commit import GroupCommitWriter
from warden_filter_worker.publisher import VerdictPublisher

COMMUNITY = "default"  # default configuration: keywords spam/spammy, hellban 60 min


@pytest.fixture
async def real_worker(
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    nats_client: NATS,
    evaluate_subject: str,
) -> AsyncIterator[EvaluationService]:
    """The filter worker's evaluation service, answering this test's gateway."""
    await ensure_verdicts_stream(nats_client.jetstream())
    service = EvaluationService(
        redis=redis_client,
        pool=pg_pool,
        pipeline=Pipeline(
            FilterDeps(redis=redis_client, pool=pg_pool, local_user_id="@policyserv:warden.test"),
            timeout_seconds=5,
        ),
        configs=CommunityConfigCache(pg_pool, instance_defaults({})),
        writer=GroupCommitWriter(pg_pool),
        publisher=VerdictPublisher(nats_client),
        claim_ttl_seconds=10,
        wait_seconds=5,
    )
    await service.start(nats_client, subject=evaluate_subject)
    yield service
    await service.stop()


async def ask(gateway: Gateway, origin: Origin, event: dict[str, Any]) -> httpx.Response:
    """``origin`` asks the gateway to sign ``event``."""
    return await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )


async def stored_verdict(pool: asyncpg.Pool, version: str, event: dict[str, Any]) -> Verdict:
    verdict = await get_verdict(pool, str(compute_event_id(get_room_version(version), event)))
    assert verdict is not None
    return verdict


async def hellbanned(redis: aioredis.Redis, user_id: str) -> bool:
    return bool(await redis.exists(redis_keys.hellban(COMMUNITY, user_id)))


# --- H5 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "padding", ["unsigned", "other_server_signature", "sender_signatures", "unsafe_key_signature"]
)
async def test_padding_nothing_signs_cannot_get_an_event_refused(
    gateway: Gateway,
    real_worker: EvaluationService,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    padding: str,
) -> None:
    home = await start_origin()  # @bob's server
    relay = await start_origin()  # another server in the room, asking first
    room_id = await protect_room(new_room_id("10"), "10")
    bob = f"@bob:{home.name}"
    event = home.event(room_id, "10", body="b" * 100, sender=bob)
    assert 450 < len(orjson.dumps(event)) < 700  # an ordinary ~500-byte message

    padded = copy.deepcopy(event)
    if padding == "unsigned":
        padded["unsigned"]["pad"] = "x" * 12_000
    elif padding == "other_server_signature":
        padded["signatures"]["junk.example"] = {"ed25519:pad": "A" * 12_000}
    elif padding == "sender_signatures":  # an entry of the sender's server no key check reads
        padded["signatures"][home.name]["pad"] = "A" * 12_000
    else:
        # A valid signature by the publicly known compromised key (its private half is
        # public), under a key ID the sender's server does not publish: anyone can add it.
        bad = nacl.signing.SigningKey(
            bytes.fromhex("0194fdc2fa2ffcc041d3ff12045b73c86e4ff95ff662a5eee82abdf44a2d0b75")
        )
        sign_event(get_room_version("10"), padded, home.name, bad, "ed25519:pad")
    if padding != "unsafe_key_signature":
        assert len(orjson.dumps(padded)) > 12_000  # over length_filter_max_length (10 000)

    r = await ask(gateway, relay, padded)
    assert r.status_code == 200, r.text  # was 400 M_FORBIDDEN spam.flooding (length)
    r = await ask(gateway, home, event)
    assert r.status_code == 200, r.text

    verdict = await stored_verdict(pg_pool, "10", event)
    assert not verdict.prohibited
    assert {f.name: f.content_class.label for f in verdict.filters}["length"] == "neutral"
    assert not await hellbanned(redis_client, bob)
    follow_up = home.event(room_id, "10", body="and another thing", sender=bob)
    r = await ask(gateway, home, follow_up)
    assert r.status_code == 200, r.text


async def test_padding_asked_through_check_changes_no_verdict_either(
    gateway: Gateway,
    real_worker: EvaluationService,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
) -> None:
    home, relay = await start_origin(), await start_origin()
    room_id = await protect_room(new_room_id("10"), "10")
    event = home.event(room_id, "10", body="b" * 100, sender=f"@bob:{home.name}")
    padded = copy.deepcopy(event)
    padded["unsigned"]["pad"] = "x" * 12_000
    event_id = str(compute_event_id(get_room_version("10"), event))

    r = await post_check(gateway, relay, padded, event_id)
    assert r.status_code == 200, r.text
    assert r.json() == {"recommendation": "ok"}  # was "spam"
    r = await ask(gateway, home, event)
    assert r.status_code == 200, r.text


# --- H2 --------------------------------------------------------------------------


def third_party_invite(
    maker: Origin,
    room_id: str,
    version: str,
    sender: str,
    signed: dict[str, Any],
    *,
    state_key: str = "",
) -> dict[str, Any]:
    """An invite made from a third-party invite, hashed (and signed) by ``maker``."""
    return maker.event(
        room_id,
        version,
        event_type="m.room.member",
        state_key=state_key or f"@z:{maker.name}",
        sender=sender,
        content={
            "membership": "invite",
            "third_party_invite": {"display_name": "spam", "signed": signed},
        },
    )


@pytest.mark.parametrize("version", ["10", "1"])
async def test_forged_third_party_invite_does_not_hellban_the_named_sender(
    gateway: Gateway,
    real_worker: EvaluationService,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    version: str,
) -> None:
    attacker = await start_origin()  # E
    home = await start_origin()  # the victim's server, which signs nothing of this
    room_id = await protect_room(new_room_id(version), version)
    victim = f"@victim:{home.name}"

    forged = third_party_invite(attacker, room_id, version, victim, {})
    if version == "10":
        forged["signatures"] = {}  # nothing required: the review's exact attack
    else:
        # Room v1: the event ID's server (the attacker's) is required and signed; that
        # must not count as the sender's signature.
        assert forged["event_id"].endswith(":" + attacker.name)
        assert set(forged["signatures"]) == {attacker.name}

    r = await ask(gateway, attacker, forged)
    assert r.status_code == 400, r.text  # the keyword is still refused
    assert r.json()["errcode"] == "M_FORBIDDEN"
    assert r.json()[HARMS_FIELD]

    verdict = await stored_verdict(pg_pool, version, forged)
    assert verdict.prohibited and verdict.sender == victim
    assert not verdict.sender_verified
    assert SENDER_UNVERIFIED in {f.name for f in verdict.filters}
    assert not await hellbanned(redis_client, victim)

    # The victim's own, properly signed message is signed (was 400 spam.flooding).
    message = home.event(room_id, version, body="hello, innocent", sender=victim)
    r = await ask(gateway, home, message)
    assert r.status_code == 200, r.text


async def test_third_party_invite_signed_by_the_senders_server_is_attributed(
    gateway: Gateway,
    real_worker: EvaluationService,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
) -> None:
    home = await start_origin()
    room_id = await protect_room(new_room_id("10"), "10")
    inviter = f"@inviter:{home.name}"
    event = third_party_invite(home, room_id, "10", inviter, {})  # signed by home

    r = await ask(gateway, home, event)
    assert r.status_code == 400, r.text
    verdict = await stored_verdict(pg_pool, "10", event)
    assert verdict.sender_verified
    assert SENDER_UNVERIFIED not in {f.name for f in verdict.filters}
    assert await hellbanned(redis_client, inviter)


@pytest.mark.parametrize("vouched", [True, False])
async def test_third_party_invite_vouched_for_by_the_rooms_invite(
    gateway: Gateway,
    real_worker: EvaluationService,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Callable[..., Awaitable[str]],
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    vouched: bool,
) -> None:
    home = await start_origin()
    room_id = await protect_room(new_room_id("10"), "10")
    inviter = f"@inviter:{home.name}"
    invitee = f"@invitee:{home.name}"
    token = uuid.uuid4().hex
    identity_key = generate_signing_key("0")
    # The room's m.room.third_party_invite, as learned over federation.
    await apply_event(
        pg_pool,
        room_id,
        {
            "type": "m.room.third_party_invite",
            "state_key": token,
            "sender": inviter,
            "room_id": room_id,
            "depth": 5,
            "content": {
                "display_name": "i***@example.org",
                "key_validity_url": "https://id.example/_matrix/identity/v2/pubkey/isvalid",
                "public_key": encode_base64(get_verify_key(identity_key).encode()),
            },
        },
        f"$tpi{uuid.uuid4().hex}",
    )
    signing_key = identity_key if vouched else generate_signing_key("0")
    signed = sign_json({"mxid": invitee, "token": token}, "id.example", signing_key)
    event = third_party_invite(home, room_id, "10", inviter, signed, state_key=invitee)
    event["signatures"] = {}  # the sender's server did not sign

    r = await ask(gateway, home, event)
    assert r.status_code == 400, r.text
    verdict = await stored_verdict(pg_pool, "10", event)
    assert verdict.sender_verified is vouched
    assert await hellbanned(redis_client, inviter) is vouched


# --- L4 --------------------------------------------------------------------------


@pytest.mark.parametrize("local", ["a\r\nWarden-Event-Id: $other", "a b", "a\x00", "a" * 260])
async def test_v1_event_ids_unfit_for_keys_and_headers_are_refused(
    gateway: Gateway,
    real_worker: EvaluationService,
    origin: Origin,
    protect_room: Callable[..., Awaitable[str]],
    pg_pool: asyncpg.Pool,
    local: str,
) -> None:
    room_id = await protect_room(new_room_id("1"), "1")
    event_id = f"${local}:{origin.name}"
    event = origin.event(room_id, "1", event_id=event_id)

    r = await ask(gateway, origin, event)

    assert r.status_code == 400, r.text
    assert r.json()["errcode"] == "M_BAD_JSON"
    assert "event_id" in r.json()["error"]
    # Nothing judged, nothing stored (a NUL could not even be looked up in PostgreSQL).
    assert await pg_pool.fetchval("SELECT count(*) FROM verdicts WHERE room_id = $1", room_id) == 0

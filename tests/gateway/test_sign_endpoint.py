"""``POST /_matrix/policy/v1/sign`` and its unstable twin, end to end in process.

Origins are real HTTPS key servers, the room records live in PostgreSQL, verdicts come
from a stand-in filter worker over real NATS, and every signature is checked the way
Synapse checks it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg
from prometheus_client import REGISTRY
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS as SYNAPSE_VERSIONS
from synapse.crypto.event_signing import add_hashes_and_signatures, compute_event_signature
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    UNSTABLE_SIGN_PATH,
    Gateway,
    Origin,
    StandInWorker,
    new_room_id,
    synapse_verifies,
    verdict_for,
)
from warden.bus.subjects import (
    HEADER_COMMUNITY,
    HEADER_EVENT_ID,
    HEADER_ORIGIN,
    HEADER_REFERENCE_HASH,
    HEADER_ROOM_VERSION,
    HEADER_SOURCE,
)
from warden.matrix.event_hashes import compute_event_id, compute_reference_hash
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version
from warden.policy import harms
from warden.policy.verdict import ContentClass
from warden.telemetry import tracing
from warden_gateway import policy_api

StartWorker = Callable[..., Awaitable[StandInWorker]]
Protect = Callable[..., Awaitable[str]]


async def post_sign(
    gateway: Gateway, origin: Origin, event: Any, path: str = SIGN_PATH, **kwargs: Any
) -> Any:
    return await gateway.client.post(
        path, content=orjson.dumps(event), headers=origin.headers(path, event), **kwargs
    )


def sign_count(endpoint: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "warden_sign_requests_total", {"endpoint": endpoint, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize("room_version", ["1", "3", "6", "11", "12"])
async def test_signs_a_judged_event_with_the_policy_key(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    room_version: str,
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id(room_version), room_version)
    event = origin.event(room_id, room_version, body="a perfectly fine message")
    signed_before = sign_count("sign", "signed")

    r = await post_sign(gateway, origin, event)

    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == [GATEWAY_NAME]
    assert list(body[GATEWAY_NAME]) == [POLICY_SERVER_KEY_ID]
    signature = body[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    # Synapse accepts it with the policy key; not with the federation key.
    assert synapse_verifies(room_version, event, GATEWAY_NAME, signature, gateway.policy_key)
    assert not synapse_verifies(
        room_version, event, GATEWAY_NAME, signature, gateway.identity.federation_key
    )
    # ed25519 is deterministic: Synapse's own signing gives the same signature.
    theirs = compute_event_signature(
        SYNAPSE_VERSIONS[room_version], event, GATEWAY_NAME, gateway.policy_key
    )
    assert theirs[GATEWAY_NAME][f"ed25519:{gateway.policy_key.version}"] == signature
    assert worker.count == 1
    assert sign_count("sign", "signed") == signed_before + 1


async def test_evaluation_request_carries_the_event_and_its_context(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("10"), "10", "default")
    event = origin.event(room_id, "10")

    r = await post_sign(gateway, origin, event)
    assert r.status_code == 200, r.text

    assert worker.count == 1
    msg = worker.requests[0]
    headers = msg.headers or {}
    version = get_room_version("10")
    assert orjson.loads(msg.data) == event
    assert headers[HEADER_EVENT_ID] == compute_event_id(version, event)

    assert headers[HEADER_REFERENCE_HASH] == encode_base64(compute_reference_hash(version, event))
    assert headers[HEADER_ROOM_VERSION] == "10"
    assert headers[HEADER_COMMUNITY] == "default"
    assert headers[HEADER_ORIGIN] == origin.name
    assert headers[HEADER_SOURCE] == "sign"
    # No exporter and no trace from upstream: no trace context to carry.
    assert "traceparent" not in headers


async def test_evaluation_request_carries_trace_context_when_exporting(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "_exporting", True)
    worker = await start_worker()
    room_id = await protect_room(new_room_id("10"), "10", "default")

    r = await post_sign(gateway, origin, origin.event(room_id, "10"))
    assert r.status_code == 200, r.text

    # W3C trace context travels with the request: the gateway's span is its parent.
    traceparent = (worker.requests[0].headers or {})["traceparent"]
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00" and int(trace_id, 16) and int(span_id, 16)


async def test_prohibited_event_is_refused_with_its_harms(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def spam(msg: Msg) -> Any:
        return verdict_for(msg, ContentClass.PROHIBITED, (harms.SPAM, harms.HARASSMENT))

    await start_worker(spam)
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12", body="buy cheap stuff")
    refused_before = sign_count("sign", "refused")
    caplog.set_level(logging.INFO, logger=policy_api.__name__)

    r = await post_sign(gateway, origin, event)

    assert r.status_code == 400
    body = r.json()
    assert body["errcode"] == "M_FORBIDDEN"
    assert isinstance(body["error"], str) and body["error"]
    assert sorted(body["org.matrix.msc4387.harms"]) == sorted([harms.SPAM, harms.HARASSMENT])
    assert GATEWAY_NAME not in body
    assert sign_count("sign", "refused") == refused_before + 1
    # The request's refusal is logged only at DEBUG (the worker logs the verdict once).
    assert not [r for r in caplog.records if r.getMessage() == "refused"]
    caplog.set_level(logging.DEBUG, logger=policy_api.__name__)
    r = await post_sign(gateway, origin, event)
    assert r.status_code == 400
    (line,) = [r for r in caplog.records if r.getMessage() == "refused"]
    assert line.levelno == logging.DEBUG
    assert line.__dict__["origin"] == origin.name
    assert sorted(line.__dict__["harms"]) == sorted([harms.SPAM, harms.HARASSMENT])


async def test_unstable_sign_signs_alike_and_refuses_with_an_empty_object(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    def by_body(msg: Msg) -> Any:
        spam = orjson.loads(msg.data)["content"]["body"] == "spam"
        return verdict_for(msg, ContentClass.PROHIBITED if spam else ContentClass.ALLOWED)

    await start_worker(by_body)
    room_id = await protect_room(new_room_id("11"), "11")
    good = origin.event(room_id, "11", body="good")
    bad = origin.event(room_id, "11", body="spam")

    r = await post_sign(gateway, origin, good, UNSTABLE_SIGN_PATH)
    assert r.status_code == 200
    signature = r.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    assert synapse_verifies("11", good, GATEWAY_NAME, signature, gateway.policy_key)

    r = await post_sign(gateway, origin, bad, UNSTABLE_SIGN_PATH)
    assert r.status_code == 200
    assert r.json() == {}

    # Other errors are the stable ones.
    r = await post_sign(
        gateway, origin, {**good, "room_id": "!unknown:origin.test"}, UNSTABLE_SIGN_PATH
    )
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_NOT_FOUND"


async def test_policy_state_event_is_always_signed_without_filters(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    def refuse_all(msg: Msg) -> Any:
        return verdict_for(msg, ContentClass.PROHIBITED, (harms.SPAM,))

    worker = await start_worker(refuse_all)
    room_id = await protect_room(new_room_id("12"), "12")
    policy = origin.event(
        room_id,
        "12",
        event_type="m.room.policy",
        state_key="",
        content={"via": "other.example", "public_keys": {"ed25519": "abc"}},
    )
    removal = origin.event(room_id, "12", event_type="m.room.policy", state_key="", content={})

    for event in (policy, removal):
        r = await post_sign(gateway, origin, event)
        assert r.status_code == 200, r.text
        signature = r.json()[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
        assert synapse_verifies("12", event, GATEWAY_NAME, signature, gateway.policy_key)
    assert worker.count == 0

    # Not exempt: another state key, or a non-state m.room.policy event.
    other_key = origin.event(room_id, "12", event_type="m.room.policy", state_key="x", content={})
    r = await post_sign(gateway, origin, other_key)
    assert r.status_code == 400
    assert r.json()["errcode"] == "M_FORBIDDEN"
    message = origin.event(room_id, "12", event_type="m.room.policy", content={})
    r = await post_sign(gateway, origin, message)
    assert r.status_code == 400
    assert worker.count == 2


async def test_policy_state_event_is_still_authenticated_and_validated(
    gateway: Gateway, origin: Origin, protect_room: Protect
) -> None:
    room_id = await protect_room(new_room_id("12"), "12")
    policy = origin.event(room_id, "12", event_type="m.room.policy", state_key="", content={})

    r = await gateway.client.post(SIGN_PATH, content=orjson.dumps(policy))
    assert r.status_code == 401
    tampered = copy.deepcopy(policy)
    tampered["content"] = {"via": "evil.example", "public_keys": {"ed25519": "x"}}
    r = await post_sign(gateway, origin, tampered)
    assert r.status_code == 400
    assert r.json()["errcode"] == "M_BAD_JSON"


async def test_unknown_room_is_not_found(gateway: Gateway, origin: Origin) -> None:
    event = origin.event(new_room_id("10"), "10")
    before = sign_count("sign", "not_found")
    r = await post_sign(gateway, origin, event)
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_NOT_FOUND"
    assert sign_count("sign", "not_found") == before + 1


async def test_room_cache_is_invalidated_by_config_change_messages(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    nats_client: Any,
) -> None:
    from warden.bus.subjects import CONFIG_CHANGED_SUBJECT

    await start_worker()
    room_id = new_room_id("10")
    event = origin.event(room_id, "10")
    r = await post_sign(gateway, origin, event)
    assert r.status_code == 404  # now cached as "not protected"

    await protect_room(room_id, "10")
    r = await post_sign(gateway, origin, event)
    assert r.status_code == 404  # still the cached answer

    await nats_client.publish(CONFIG_CHANGED_SUBJECT, orjson.dumps({"room_id": room_id}))
    await nats_client.flush()
    for _ in range(200):  # the message is handled by the subscription's own task
        r = await post_sign(gateway, origin, event)
        if r.status_code != 404:
            break
        await asyncio.sleep(0.01)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        (b"", "M_NOT_JSON"),
        (b"not json", "M_NOT_JSON"),
        (b'{"a": ', "M_NOT_JSON"),
        (b"[1, 2]", "M_NOT_JSON"),
        (b'"string"', "M_NOT_JSON"),
        (b"\xff\xfe{}", "M_NOT_JSON"),
        (b'{"a": 1.5}', "M_BAD_JSON"),
        (b'{"a": 1, "a": 2}', "M_BAD_JSON"),
        (b'{"a": 9007199254740992}', "M_BAD_JSON"),
    ],
)
async def test_bodies_that_are_not_matrix_json(
    gateway: Gateway, origin: Origin, body: bytes, errcode: str
) -> None:
    r = await gateway.client.post(
        SIGN_PATH,
        content=body,
        headers={"Authorization": origin.auth(SIGN_PATH, {}), "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["errcode"] == errcode


def _resign(origin: Origin, event: dict[str, Any], room_version: str) -> dict[str, Any]:
    event = copy.deepcopy(event)
    event.pop("signatures", None)
    event.pop("hashes", None)
    event.pop("unsigned", None)
    add_hashes_and_signatures(SYNAPSE_VERSIONS[room_version], event, origin.name, origin.key)
    return event


async def test_invalid_pdus_are_bad_json(
    gateway: Gateway, origin: Origin, start_worker: StartWorker, protect_room: Protect
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("11"), "11")
    good = origin.event(room_id, "11")

    missing_depth = _resign(origin, {k: v for k, v in good.items() if k != "depth"}, "11")
    bad_sender = _resign(origin, {**good, "sender": "not-a-user"}, "11")
    v1_style_refs = _resign(origin, {**good, "prev_events": [["$a:b", {}]]}, "11")
    hash_mismatch = copy.deepcopy(good)
    hash_mismatch["content"]["body"] = "changed after hashing"
    unsigned_by_sender = copy.deepcopy(good)
    unsigned_by_sender["signatures"] = {}
    bad_signature = copy.deepcopy(good)
    sig = bad_signature["signatures"][origin.name][origin.key_id]
    bad_signature["signatures"][origin.name][origin.key_id] = ("A" if sig[0] != "A" else "B") + sig[
        1:
    ]
    unknown_key = copy.deepcopy(good)
    unknown_key["signatures"][origin.name] = {"ed25519:nope": sig}
    # Signed by the origin, but the sender belongs to another server.
    foreign_sender = _resign(origin, {**good, "sender": "@bob:elsewhere.test"}, "11")

    cases = {
        "missing depth": missing_depth,
        "bad sender": bad_sender,
        "v1-style prev_events": v1_style_refs,
        "content hash mismatch": hash_mismatch,
        "no sender signature": unsigned_by_sender,
        "bad sender signature": bad_signature,
        "unknown signing key": unknown_key,
        "foreign sender": foreign_sender,
    }
    for name, event in cases.items():
        r = await post_sign(gateway, origin, event)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["errcode"] == "M_BAD_JSON", name
        assert r.json()["error"], name
    assert worker.count == 0

    r = await post_sign(gateway, origin, good)
    assert r.status_code == 200


async def test_authentication_is_required_and_checked(
    gateway: Gateway,
    origin: Origin,
    start_origin: Callable[[], Awaitable[Origin]],
    protect_room: Protect,
) -> None:
    room_id = await protect_room(new_room_id("12"), "12")
    event = origin.event(room_id, "12")
    body = orjson.dumps(event)
    impostor = await start_origin()

    def forged_header() -> str:
        # Claims to be ``origin`` but is signed with the impostor's key and key ID.
        header = impostor.auth(SIGN_PATH, event)
        return header.replace(f'origin="{impostor.name}"', f'origin="{origin.name}"')

    cases = {
        "missing": {},
        "other scheme": {"Authorization": "Bearer abc"},
        "malformed": {"Authorization": "X-Matrix origin="},
        "wrong destination": {"Authorization": origin.auth(SIGN_PATH, event, "other.test")},
        "signed other content": {"Authorization": origin.auth(SIGN_PATH, {"x": 1})},
        "signed other path": {"Authorization": origin.auth(UNSTABLE_SIGN_PATH, event)},
        "forged": {"Authorization": forged_header()},
    }
    before = sign_count("sign", "unauthorized")
    for name, headers in cases.items():
        r = await gateway.client.post(SIGN_PATH, content=body, headers=headers)
        assert r.status_code == 401, (name, r.text)
        assert r.json()["errcode"] == "M_UNAUTHORIZED", name
    assert sign_count("sign", "unauthorized") == before + len(cases)


async def test_wrong_method_is_unrecognized(gateway: Gateway) -> None:
    for path in (SIGN_PATH, UNSTABLE_SIGN_PATH):
        r = await gateway.client.get(path)
        assert r.status_code == 405
        assert r.json()["errcode"] == "M_UNRECOGNIZED"
        assert "POST" in r.headers["allow"]
        r = await gateway.client.put(path, content=b"{}")
        assert r.status_code == 405


async def test_reused_event_id_with_other_content_is_refused(
    gateway: Gateway,
    origin: Origin,
    start_worker: StartWorker,
    protect_room: Protect,
    make_gateway: Any,
) -> None:
    worker = await start_worker()
    room_id = await protect_room(new_room_id("1", origin.name), "1")
    first = origin.event(room_id, "1", body="first", event_id=f"$reused:{origin.name}")
    second = origin.event(room_id, "1", body="second", event_id=f"$reused:{origin.name}")
    # Different redacted forms (the hashes differ), same event ID.
    version = get_room_version("1")
    assert compute_reference_hash(version, first) != compute_reference_hash(version, second)

    r = await post_sign(gateway, origin, first)
    assert r.status_code == 200
    r = await post_sign(gateway, origin, second)
    assert r.status_code == 400
    assert r.json()["errcode"] == "M_FORBIDDEN"
    assert "already judged" in r.json()["error"]
    # Another replica (empty memory) is answered the stored verdict and refuses too.
    other = await make_gateway()
    r = await post_sign(other, origin, second)
    assert r.status_code == 400
    assert r.json()["errcode"] == "M_FORBIDDEN"
    r = await post_sign(other, origin, first)
    assert r.status_code == 200
    assert worker.decided == 1

"""``warden sign-request`` against a running gateway process.

The gateway is a real ``warden gateway`` child process; the filter worker is the
stand-in on the real ``EVALUATE_SUBJECT``; the command runs as a real child process too,
serving its origin's key over HTTPS while it asks for the signature.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from signedjson.key import generate_signing_key, get_verify_key, read_signing_keys

from tests.gateway.policy_harness import (
    DEV_ORIGIN_ENV,
    GATEWAY_NAME,
    SIGN_PATH,
    StandInWorker,
    parse_output,
    run_command,
    synapse_verifies,
    verdict_for,
)
from tests.service_processes import ServiceProcess, free_port
from warden.bus.subjects import EVALUATE_SUBJECT
from warden.dev.sign_request import build_event
from warden.matrix.event_hashes import check_content_hash
from warden.matrix.event_signing import verify_sender_signature
from warden.matrix.keys import POLICY_SERVER_KEY_ID, key_id_of
from warden.matrix.pdu import validate_pdu
from warden.matrix.room_versions import get_room_version
from warden.policy import harms
from warden.policy.verdict import ContentClass


@pytest.mark.parametrize("version", ["1", "3", "12"])
def test_built_events_are_valid_and_signed_by_the_origin(version: str) -> None:
    room_version = get_room_version(version)
    key = generate_signing_key("a_test")
    room_id = "!room" if version == "12" else "!room:origin.example"
    event = build_event(
        room_version,
        room_id=room_id,
        sender="@tester:origin.example",
        origin="origin.example",
        signing_key=key,
        content={"msgtype": "m.text", "body": "hi"},
    )
    validate_pdu(room_version, event)
    assert check_content_hash(event)
    verify_sender_signature(
        room_version, event, {"origin.example": {key_id_of(key): get_verify_key(key)}}
    )


@pytest.fixture
async def real_subject_worker(nats_client: NATS) -> AsyncIterator[StandInWorker]:
    """The stand-in worker on the real subject: body "spam" is refused, the rest allowed."""

    def decide(msg: Msg) -> Any:
        if orjson.loads(msg.data)["content"].get("body") == "spam":
            return verdict_for(msg, ContentClass.PROHIBITED, (harms.SPAM,))
        return verdict_for(msg, ContentClass.NEUTRAL)

    worker = await StandInWorker(nats_client, EVALUATE_SUBJECT, decide).start()
    yield worker
    await worker.stop()


@pytest.mark.slow
async def test_sign_request_gets_a_valid_signature_from_a_running_gateway(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    key_paths: tuple[Path, Path],
    real_subject_worker: StandInWorker,
    protect_room: Callable[..., Awaitable[str]],
    tmp_path: Path,
) -> None:
    gateway = spawn_service("gateway", **DEV_ORIGIN_ENV)
    await asyncio.to_thread(gateway.wait_ready)
    assert gateway.api_url
    room_id = await protect_room(f"!{uuid.uuid4().hex}", "12")
    saved = tmp_path / "event.json"
    origin_key = tmp_path / "origin.key"
    origin_key.write_text("ed25519 a_orig " + "A" * 43 + "\n")
    key_port = str(free_port())
    url = f"{gateway.api_url}{SIGN_PATH}"
    as_origin = ["--url", url, "--origin-key", str(origin_key), "--key-port", key_port]

    code, stdout, stderr = await run_command(
        service_env,
        *as_origin,
        "--build-event",
        "--room",
        room_id,
        "--room-version",
        "12",
        "--body-text",
        "hello from the command",
        "--save-event",
        str(saved),
    )

    assert code == 0, (stdout, stderr, gateway.output())
    status, body = parse_output(stdout)
    assert status == 200
    signature = body[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    event = orjson.loads(saved.read_bytes())
    assert event["content"]["body"] == "hello from the command"
    assert event["sender"] == f"@tester:127.0.0.1:{key_port}"
    policy_key = read_signing_keys(key_paths[1].open())[0]
    assert synapse_verifies("12", event, GATEWAY_NAME, signature, policy_key)
    assert real_subject_worker.count == 1

    # Replaying the saved event as the same origin: the same signature, from the
    # gateway's cache (no second evaluation).
    code, stdout, stderr = await run_command(service_env, *as_origin, "--body", str(saved))
    assert code == 0, (stdout, stderr)
    assert parse_output(stdout) == (200, body)
    assert real_subject_worker.count == 1

    # Someone else claiming to be that origin (another key) is not authenticated.
    code, stdout, _ = await run_command(
        service_env,
        "--url",
        url,
        "--origin",
        f"127.0.0.1:{key_port}",
        "--body",
        str(saved),
    )
    assert code == 1
    status, body = parse_output(stdout)
    assert status == 401
    assert body["errcode"] == "M_UNAUTHORIZED"
    assert real_subject_worker.count == 1

    # A refusal comes back with its harms and exit status 1.
    code, stdout, _ = await run_command(
        service_env,
        "--url",
        f"{gateway.api_url}{SIGN_PATH}",
        "--build-event",
        "--room",
        room_id,
        "--body-text",
        "spam",
    )
    assert code == 1
    status, body = parse_output(stdout)
    assert status == 400
    assert body["errcode"] == "M_FORBIDDEN"
    assert body["org.matrix.msc4387.harms"] == [harms.SPAM]

    metrics = httpx.get(f"{gateway.metrics_url}/metrics").text
    assert 'warden_sign_requests_total{endpoint="sign",outcome="signed"} 2.0' in metrics
    assert 'warden_sign_requests_total{endpoint="sign",outcome="unauthorized"} 1.0' in metrics
    assert 'warden_sign_requests_total{endpoint="sign",outcome="refused"} 1.0' in metrics
    assert 'warden_verdict_cache_total{layer="nats"} 2.0' in metrics
    assert 'warden_verdict_cache_total{layer="memory"} 1.0' in metrics
    assert gateway.stop() == 0


@pytest.mark.slow
async def test_running_gateway_refuses_an_oversized_chunked_body(
    spawn_service: Callable[..., ServiceProcess],
) -> None:
    gateway = spawn_service("gateway", PS_MAX_PDU_BYTES="2048")
    await asyncio.to_thread(gateway.wait_ready)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"content": {"body": "'
        for _ in range(100):
            yield b"x" * 512
        yield b'"}}'

    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{gateway.api_url}{SIGN_PATH}", content=chunks())
        assert r.status_code == 413
        assert r.json()["errcode"] == "M_TOO_LARGE"
        r = await client.get(f"{gateway.api_url}/.well-known/matrix/policy_server")
        assert r.status_code == 200
        assert set(r.json()["public_keys"]) == {"ed25519"}
    assert gateway.stop() == 0

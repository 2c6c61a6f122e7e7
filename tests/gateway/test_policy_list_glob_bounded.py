"""Review H3, black-box: a hostile policy-list glob no longer wedges the filter worker.

The real gateway and filter-worker run as processes. A list room used by a community
holds the review's rule (``"*" * 28 + "§"``, which the old regex translation never
finished matching) next to an ordinary ban; ``/sign`` of events in the community's room
is answered (200 for a bystander, 400 for the banned user) and the worker stays live.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import DEV_ORIGIN_ENV, SIGN_PATH, parse_output, run_command
from tests.service_processes import ServiceProcess
from warden.storage import room_state

ADMIN = {"Authorization": "Bearer k"}


def rule(entity: str, state_key: str) -> dict[str, Any]:
    """An ``m.policy.rule.user`` ban as the room-state consumer would learn it."""
    return {
        "type": "m.policy.rule.user",
        "state_key": state_key,
        "sender": "@mod:lists.example",
        "room_id": "!ignored:lists.example",
        "content": {"entity": entity, "recommendation": "m.ban", "reason": "spam"},
        "origin_server_ts": 1,
        "depth": 5,
        "auth_events": [],
        "prev_events": [],
        "hashes": {"sha256": "x"},
        "signatures": {},
    }


@pytest.mark.slow
async def test_a_hostile_glob_in_a_list_room_leaves_sign_answering(
    spawn_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    pg_pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    worker = spawn_service("filter-worker")
    gateway = spawn_service("gateway", PS_API_KEY="k", **DEV_ORIGIN_ENV)
    await asyncio.to_thread(worker.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    list_room = "!" + encode_base64(os.urandom(32), urlsafe=True)
    room = "!" + encode_base64(os.urandom(32), urlsafe=True)
    async with httpx.AsyncClient(base_url=f"{gateway.api_url}/api/v1", timeout=30) as admin:
        r = await admin.post("/communities/new", json={"name": "lists"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        community = r.json()["community_id"]
        r = await admin.patch(
            f"/communities/{community}",
            json={"config": {"policy_list_room_ids": [list_room]}},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        for room_id in (list_room, room):
            r = await admin.put(
                f"/rooms/{urllib.parse.quote(room_id, safe='')}",
                json={"room_version": "12", "community_id": community},
                headers=ADMIN,
            )
            assert r.status_code == 200, r.text
    # Learned as the room-state consumer stores list-room state.
    for state_key, entity in (("hostile", "*" * 28 + "§"), ("plain", "@banned:*")):
        await room_state.apply_event(pg_pool, list_room, rule(entity, state_key), f"${state_key}")

    async def sign(*args: str) -> tuple[int, Any]:
        code, stdout, stderr = await run_command(
            service_env, "--url", f"{gateway.api_url}{SIGN_PATH}", *args
        )
        assert code in (0, 1), (stdout, stderr, gateway.output(), worker.output())
        return parse_output(stdout)

    saved = tmp_path / "event.json"
    status, body = await sign(
        "--build-event", "--room", room, "--body-text", "hello", "--save-event", str(saved)
    )
    assert status == 200, (body, worker.output())

    # The ordinary ban of the same list still works: the rules were read and matched.
    banned = orjson.loads(saved.read_bytes())
    banned["sender"] = "@banned:placeholder"
    banned["content"] = {"msgtype": "m.text", "body": f"spam {uuid.uuid4().hex}"}
    banned.pop("signatures", None)
    banned.pop("hashes", None)
    template = tmp_path / "banned.json"
    template.write_bytes(orjson.dumps(banned))
    status, body = await sign("--body", str(template), "--sign-event")
    assert status == 400 and body["errcode"] == "M_FORBIDDEN", body

    # The worker keeps serving: live, and the next event is judged too.
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"{worker.metrics_url}/livez")).status_code == 200
    status, body = await sign("--build-event", "--room", room, "--body-text", "again")
    assert status == 200, body
    assert worker.proc.poll() is None
    assert gateway.stop() == 0
    assert worker.stop() == 0

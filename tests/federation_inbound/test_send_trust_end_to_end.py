"""The review's black-box tests for H1, M4 and L8 through real gateway and filter-worker
processes: a server that is not in a protected room cannot teach Warden members, rules
or Warden's own ban over ``/send``, nor get its events judged (no verdict, redaction
or webhook); a legitimate kick of Warden's user makes ``/sign`` answer as for an
unknown room."""

from __future__ import annotations

import asyncio
import string
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.federation_inbound.test_send_end_to_end import API, poll
from tests.gateway.policy_harness import DEV_ORIGIN_ENV, GATEWAY_NAME, SIGN_PATH, Origin
from tests.room_state.room_setup import seed_room
from tests.service_processes import ServiceProcess
from warden.federation.xmatrix import sign_request
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.storage import room_state

WARDEN_USER = f"@policyserv:{GATEWAY_NAME}"
FOX = "the quick brown fox jumps over the lazy dog, again and again"


def metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


async def put_txn(client: httpx.AsyncClient, origin: Origin, pdus: list[dict[str, Any]]) -> None:
    uri = f"/_matrix/federation/v1/send/t{uuid.uuid4().hex}"
    txn = {"origin": origin.name, "origin_server_ts": 1, "pdus": pdus}
    auth = sign_request(origin.name, GATEWAY_NAME, "PUT", uri, txn, origin.key)
    r = await client.put(uri, json=txn, headers={"Authorization": auth})
    assert r.status_code == 200, r.text
    assert all(v == {} for v in r.json()["pdus"].values()), r.text


async def sign(client: httpx.AsyncClient, origin: Origin, pdu: dict[str, Any]) -> httpx.Response:
    auth = sign_request(origin.name, GATEWAY_NAME, "POST", SIGN_PATH, pdu, origin.key)
    return await client.post(SIGN_PATH, json=pdu, headers={"Authorization": auth})


@pytest.mark.slow
async def test_a_server_not_in_the_room_cannot_poison_learned_state_or_get_judged(
    spawn_service: Callable[..., ServiceProcess],
    key_paths: tuple[Path, Path],
    tls_ca_file: str,
    start_origin: Callable[[], Any],
    pg_pool: asyncpg.Pool,
) -> None:
    resident: Origin = await start_origin()
    attacker: Origin = await start_origin()
    env = {
        **DEV_ORIGIN_ENV,
        "PS_FEDERATION_CA_FILE": tls_ca_file,
        "PS_TRUSTED_ORIGINS": resident.name,
    }
    worker = spawn_service("filter-worker", **env)
    gateway = spawn_service("gateway", PS_API_KEY="k", **env)
    await asyncio.to_thread(worker.wait_ready)
    await asyncio.to_thread(gateway.wait_ready)
    version = get_room_version("10")
    room_id = f"!{uuid.uuid4().hex}:{resident.name}"
    quoted = urllib.parse.quote(room_id, safe="")
    mod, bob, eve = f"@mod:{resident.name}", f"@bob:{resident.name}", f"@eve:{attacker.name}"

    async with httpx.AsyncClient(base_url=gateway.api_url, timeout=30) as client:
        r = await client.put(
            f"/api/v1/rooms/{quoted}",
            headers=API,
            json={"room_version": "10", "community_id": "default"},
        )
        assert r.status_code == 200, r.text
        # What Warden's verified join taught it: mod, bob and Warden's user are in.
        await seed_room(
            pg_pool,
            resident,
            room_id,
            "10",
            members={mod: 100, bob: 0},
            extra_joined=(WARDEN_USER,),
            our_user_id=WARDEN_USER,
        )

        # The attacker's server is not in the room: 26 joins with single-letter state
        # keys (H1 1), a ban-everyone rule (H1 2), a ban of Warden's user (H1 3) and
        # spam that did not ask Warden (M4).
        fakes = [
            attacker.event(
                room_id,
                "10",
                event_type="m.room.member",
                state_key=letter,
                content={"membership": "join"},
                sender=eve,
            )
            for letter in string.ascii_lowercase
        ]
        rule = attacker.event(
            room_id,
            "10",
            event_type="m.policy.rule.user",
            state_key="rule:all",
            content={"entity": "*", "recommendation": "m.ban"},
            sender=eve,
        )
        ban = attacker.event(
            room_id,
            "10",
            event_type="m.room.member",
            state_key=WARDEN_USER,
            content={"membership": "ban"},
            sender=eve,
        )
        spam = attacker.event(room_id, "10", body="this is spam", sender=eve)
        sent = [*fakes, rule, ban, spam]
        await put_txn(client, attacker, fakes[:20])
        await put_txn(client, attacker, [*fakes[20:], rule, ban, spam])

        async def all_handled() -> bool:
            text = httpx.get(f"{worker.metrics_url}/metrics").text
            handled = sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("warden_room_state_pdus_total{")
            )
            return handled >= len(sent)

        await poll(all_handled, "the worker to handle the attacker's PDUs", timeout=60)

        # bob's sentence mentions no learned member: signed.
        fox = resident.event(room_id, "10", body=FOX, sender=bob)
        r = await sign(client, resident, fox)
        assert r.status_code == 200, r.text
        assert GATEWAY_NAME in r.json()
        assert set(await room_state.get_policy_rules(pg_pool, [room_id])) == set()
        r = await sign(client, resident, resident.event(room_id, "10", body="hi", sender=bob))
        assert r.status_code == 200, r.text  # and bob is not hellbanned
        # The attacker's events got no verdict (so no redaction and no webhook).
        for pdu in (spam, rule):
            event_id = urllib.parse.quote(str(compute_event_id(version, pdu)), safe="")
            r = await client.get(f"/api/v1/events/{event_id}", headers=API)
            assert r.status_code == 404, r.text

        async def all_dropped() -> bool:
            text = httpx.get(f"{worker.metrics_url}/metrics").text
            dropped = metric(text, "warden_room_state_pdus_total", 'outcome="origin_not_in_room"')
            # Each PDU is tried NOT_IN_ROOM_ATTEMPTS (3) times, then dropped.
            return dropped >= 3 * len(sent)

        await poll(all_dropped, "the worker to drop the attacker's PDUs", timeout=60)
        assert set(await room_state.get_policy_rules(pg_pool, [room_id])) == set()
        r = await sign(client, resident, resident.event(room_id, "10", body=FOX, sender=mod))
        assert r.status_code == 200, r.text

        # L8: a kick of Warden's user by mod (who has the power), sent by the resident:
        # /sign for the room now answers as for an unknown room.
        kick = resident.event(
            room_id,
            "10",
            event_type="m.room.member",
            state_key=WARDEN_USER,
            content={"membership": "leave"},
            sender=mod,
        )
        await put_txn(client, resident, [kick])

        async def unknown_room() -> bool:
            r = await sign(client, resident, resident.event(room_id, "10", sender=bob))
            return r.status_code == 404 and r.json()["errcode"] == "M_NOT_FOUND"

        await poll(unknown_room, "/sign to answer 404 after Warden's removal", timeout=60)
    assert gateway.stop() == 0
    assert worker.stop() == 0, worker.output()

"""No answer flips across the move from policyserv: after ``warden import-policyserv``,
``/sign`` of an event policyserv refused is refused with the same harms, and of one it
allowed is signed, although Warden's own filters would judge both the other way. The
gateway is asked over HTTP by a real origin, answered by the real filter worker."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import orjson

from tests.gateway.policy_harness import (
    GATEWAY_NAME,
    SIGN_PATH,
    Gateway,
    Origin,
    new_room_id,
    synapse_verifies,
)
from tests.gateway.real_worker import real_worker  # noqa: F401
from tests.policyserv_import.policyserv_db import policyserv_database
from warden.matrix.event_hashes import compute_event_id
from warden.matrix.keys import POLICY_SERVER_KEY_ID
from warden.matrix.room_versions import get_room_version
from warden.policy.harms import HARMS_FIELD
from warden.policyserv_import import run_import
from warden.storage.verdicts import get_verdict
from warden_filter_worker.evaluation import EvaluationService

VERSION = "12"
FRAUD = "org.matrix.msc4456.spam.fraud"
CSAM = "org.matrix.msc4456.child_safety.csam"


async def sign(gateway: Gateway, origin: Origin, event: dict[str, Any]) -> tuple[int, Any]:
    r = await gateway.client.post(
        SIGN_PATH, content=orjson.dumps(event), headers=origin.headers(SIGN_PATH, event)
    )
    return r.status_code, r.json()


async def test_imported_verdicts_decide_sign(
    gateway: Gateway,
    origin: Origin,
    real_worker: EvaluationService,  # noqa: F811
    pg_database: str,
    pg_pool: asyncpg.Pool,
) -> None:
    community = f"ps_{uuid.uuid4().hex[:12]}"
    room_id = new_room_id(VERSION)
    # Warden's default configuration would sign this one (nothing in it)...
    refused = origin.event(room_id, VERSION, body="an ordinary hello")
    # ...and refuse this one (the default keywords are "spammy spam").
    allowed = origin.event(room_id, VERSION, body="spammy spam, policyserv let it through")
    fresh = origin.event(room_id, VERSION, body="spammy spam never seen by policyserv")
    version = get_room_version(VERSION)
    refused_id, allowed_id = (str(compute_event_id(version, e)) for e in (refused, allowed))

    async with policyserv_database(
        [
            ("INSERT INTO communities VALUES ($1, 'Moved', '{}', 'pst_moved', FALSE)", [community]),
            ("INSERT INTO rooms VALUES ($1, $2, '', 0, $3)", [room_id, VERSION, community]),
            ("DELETE FROM communities WHERE id = 'default'", []),
            (
                "INSERT INTO events (event_id, is_probably_spam, confidence_vectors)"
                " VALUES ($1, TRUE, $2), ($3, FALSE, '{\"Allowed\": 1.0}')",
                [
                    refused_id,
                    orjson.dumps({f"h:{FRAUD}": 1.0, f"h:{CSAM}": 1.0}).decode(),
                    allowed_id,
                ],
            ),
        ]
    ) as source:
        report = await run_import(source, pg_database, dry_run=False)
    assert report.kinds["verdicts"].created == 2
    assert report.kinds["rooms"].created == 1

    status, body = await sign(gateway, origin, refused)
    assert status == 400, body
    assert body["errcode"] == "M_FORBIDDEN"
    assert sorted(body[HARMS_FIELD]) == sorted([FRAUD, CSAM])

    status, body = await sign(gateway, origin, allowed)
    assert status == 200, body
    signature = body[GATEWAY_NAME][POLICY_SERVER_KEY_ID]
    assert synapse_verifies(VERSION, allowed, GATEWAY_NAME, signature, gateway.policy_key)

    # Not imported: judged by Warden's own filters (the keyword), so the import decided
    # the two answers above.
    status, body = await sign(gateway, origin, fresh)
    assert status == 400, body
    stored = await get_verdict(pg_pool, allowed_id)
    assert stored is not None and stored.filters[0].name == "policyserv_import"

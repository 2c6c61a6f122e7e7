"""A room v1/v2 refusal imported from policyserv (its event ID names no content) is bound
to the first event asked about under its ID: ``/sign`` of that event is refused with
policyserv's harms, and another event under the same ID is then refused as any reused
event ID is. Room v1/v2 verdicts that allowed are not imported: judged afresh by
Warden's filters. Real gateway over HTTP, real filter worker, real databases."""

from __future__ import annotations

import uuid

import asyncpg
import orjson
from unpaddedbase64 import encode_base64

from tests.gateway.policy_harness import Gateway, Origin, new_room_id
from tests.gateway.real_worker import real_worker  # noqa: F401
from tests.gateway.test_policyserv_import_sign import CSAM, FRAUD, sign
from tests.policyserv_import.policyserv_db import policyserv_database
from warden.matrix.event_hashes import compute_reference_hash
from warden.matrix.room_versions import get_room_version
from warden.policy.harms import HARMS_FIELD
from warden.policyserv_import import run_import
from warden.policyserv_import.verdicts import SKIP_V1_V2_NOT_REFUSED
from warden.storage.verdicts import get_verdict
from warden_filter_worker.evaluation import EvaluationService
from warden_gateway.policy_api import REUSED_ID_MESSAGE


async def test_a_room_v1_refusal_is_bound_on_first_sight(
    gateway: Gateway,
    origin: Origin,
    real_worker: EvaluationService,  # noqa: F811
    pg_database: str,
    pg_pool: asyncpg.Pool,
) -> None:
    version = "1"
    community = f"ps_{uuid.uuid4().hex[:12]}"
    room_id = new_room_id(version)
    refused_id = f"${uuid.uuid4().hex}:{origin.name}"
    allowed_id = f"${uuid.uuid4().hex}:{origin.name}"
    # Warden's default configuration would sign the refused one (nothing in it) and
    # refuse the allowed one (the default keywords are "spammy spam").
    refused = origin.event(room_id, version, body="an ordinary hello", event_id=refused_id)
    allowed = origin.event(room_id, version, body="spammy spam, let through", event_id=allowed_id)

    async with policyserv_database(
        [
            ("INSERT INTO communities VALUES ($1, 'Moved', '{}', 'pst_v1', FALSE)", [community]),
            ("INSERT INTO rooms VALUES ($1, $2, '', 0, $3)", [room_id, version, community]),
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
        verdicts = report.kinds["verdicts"]
        assert (verdicts.created, verdicts.skipped, report.verdicts_unbound) == (1, 1, 1)
        assert list(verdicts.reasons) == [SKIP_V1_V2_NOT_REFUSED]
        stored = await get_verdict(pg_pool, refused_id)
        assert stored is not None and stored.reference_hash == ""  # not bound yet

        status, body = await sign(gateway, origin, refused)
        assert status == 400, body
        assert body["errcode"] == "M_FORBIDDEN"
        assert body["error"] != REUSED_ID_MESSAGE
        assert sorted(body[HARMS_FIELD]) == sorted([FRAUD, CSAM])
        # Bound to the event asked about, in the room and community it came in.
        digest = compute_reference_hash(get_room_version(version), refused)
        stored = await get_verdict(pg_pool, refused_id)
        assert stored is not None
        assert stored.reference_hash == encode_base64(digest)
        assert (stored.room_id, stored.community_id) == (room_id, community)
        assert stored.filters[0].name == "policyserv_import"

        # Other content under the same ID: a reused event ID, not policyserv's refusal.
        other = origin.event(room_id, version, body="a different hello", event_id=refused_id)
        status, body = await sign(gateway, origin, other)
        assert status == 400, body
        assert body["error"] == REUSED_ID_MESSAGE
        assert not body.get(HARMS_FIELD)
        # Asking about the first event again still gives policyserv's refusal.
        status, body = await sign(gateway, origin, refused)
        assert status == 400 and sorted(body[HARMS_FIELD]) == sorted([FRAUD, CSAM]), body

        # Not imported: judged afresh by Warden's filters (stricter, never looser).
        status, body = await sign(gateway, origin, allowed)
        assert status == 400, body
        fresh = await get_verdict(pg_pool, allowed_id)
        assert fresh is not None and fresh.filters[0].name != "policyserv_import"

        # A second import changes nothing, and the binding stands.
        again = await run_import(source, pg_database, dry_run=False)
    verdicts = again.kinds["verdicts"]
    assert (verdicts.created, verdicts.unchanged, again.verdicts_unbound) == (0, 1, 0)
    after = await get_verdict(pg_pool, refused_id)
    assert after == stored

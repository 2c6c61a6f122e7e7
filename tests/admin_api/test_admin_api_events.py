"""``GET /api/v1/events/{event_id}``: a stored verdict with every filter's outcome."""

from __future__ import annotations

import dataclasses
import itertools
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.admin_api.admin_api_helpers import assert_matrix_error
from warden.matrix.event_hashes import add_content_hash, compute_event_id
from warden.matrix.room_versions import get_room_version
from warden.policy.harms import SPAM
from warden.policy.verdict import SENDER_UNVERIFIED, ContentClass, FilterOutcome, Verdict
from warden.storage.verdicts import insert_verdicts


def real_event_id(version: str, must_contain: str = "") -> str:
    """The ID of a real event in a room of ``version`` containing every character of
    ``must_contain`` (tries events until one does)."""
    room_version = get_room_version(version)
    for n in itertools.count():
        event = {
            "type": "m.room.message",
            "room_id": "!room:example.org",
            "sender": "@alice:example.org",
            "content": {"msgtype": "m.text", "body": f"hello {n}"},
            "origin_server_ts": 1_700_000_000_000 + n,
            "depth": 5,
            "prev_events": ["$prev"],
            "auth_events": ["$auth"],
            "signatures": {},
        }
        add_content_hash(event)
        event_id = str(compute_event_id(room_version, event))
        if all(ch in event_id for ch in must_contain):
            return event_id
    raise AssertionError("unreachable")


def verdict_for(event_id: str) -> Verdict:
    return Verdict(
        event_id=event_id,
        content_class=ContentClass.PROHIBITED,
        harms=(SPAM,),
        filters=(
            FilterOutcome("event_type_prefilter", ContentClass.NEUTRAL, duration_ms=0.01),
            FilterOutcome("keyword", ContentClass.PROHIBITED, (SPAM,), duration_ms=1.25),
            FilterOutcome("media", ContentClass.NEUTRAL, error="timed out", duration_ms=5000),
        ),
        room_id="!room:example.org",
        community_id="default",
        sender="@alice:example.org",
        event_type="m.room.message",
        origin="example.org",
        reference_hash="cmVm",
        first_seen_ts=1_700_000_000_123,
    )


EXPECTED_FILTERS = [
    {"name": "event_type_prefilter", "class": "neutral", "harms": [], "duration_ms": 0.01},
    {"name": "keyword", "class": "prohibited", "harms": [SPAM], "duration_ms": 1.25},
    {
        "name": "media",
        "class": "neutral",
        "harms": [],
        "duration_ms": 5000.0,
        "error": "timed out",
    },
]


@pytest.mark.parametrize(
    "event_id",
    [
        pytest.param(real_event_id("3", "/+"), id="v3-with-slash-and-plus"),
        pytest.param(real_event_id("10", "-_"), id="v10-urlsafe"),
        pytest.param(real_event_id("12"), id="v12"),
        pytest.param("$1700000000abcd:example.org", id="v1-with-server"),
    ],
)
async def test_a_stored_verdict_is_shown_with_every_filter(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, event_id: str
) -> None:
    await insert_verdicts(admin_pool, [verdict_for(event_id)])
    for path in (event_id, quote(event_id, safe=""), quote(event_id, safe="$/+:")):
        r = await admin.get(f"/api/v1/events/{path}")
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        assert body == {
            "event_id": event_id,
            "class": "prohibited",
            "harms": [SPAM],
            "filters": EXPECTED_FILTERS,
            "room_id": "!room:example.org",
            "community_id": "default",
            "sender": "@alice:example.org",
            "event_type": "m.room.message",
            "origin": "example.org",
            "reference_hash": "cmVm",
            "first_seen_ts": 1_700_000_000_123,
            "sender_verified": True,
        }


async def test_a_verdict_on_an_unverified_sender_says_so(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    # Review H2: a third-party invite nobody proved the named sender made.
    event_id = real_event_id("10")
    verdict = verdict_for(event_id)
    unverified = FilterOutcome(SENDER_UNVERIFIED, ContentClass.NEUTRAL)
    verdict = dataclasses.replace(verdict, filters=(unverified, *verdict.filters))
    await insert_verdicts(admin_pool, [verdict])
    r = await admin.get(f"/api/v1/events/{quote(event_id, safe='')}")
    assert r.status_code == 200, r.text
    assert r.json()["sender_verified"] is False
    assert r.json()["filters"][0] == {
        "name": SENDER_UNVERIFIED,
        "class": "neutral",
        "harms": [],
        "duration_ms": 0.0,
    }


async def test_unknown_events_are_404(admin: httpx.AsyncClient, admin_pool: asyncpg.Pool) -> None:
    event_id = real_event_id("3", "/")
    await insert_verdicts(admin_pool, [verdict_for(real_event_id("10"))])
    for path in (event_id, quote(event_id, safe=""), "$nothing", "not-an-id", "a/b/c"):
        assert_matrix_error(await admin.get(f"/api/v1/events/{path}"), 404, "M_NOT_FOUND")
    # A prefix of a stored ID is not that ID (the path is not matched loosely).
    assert_matrix_error(
        await admin.get(f"/api/v1/events/{event_id.rsplit('/', 1)[0]}"), 404, "M_NOT_FOUND"
    )


async def test_a_dry_run_outcome_is_shown_as_such(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    event_id = real_event_id("10")
    dry = FilterOutcome("many_ats", ContentClass.PROHIBITED, (SPAM,), dry_run=True)
    verdict = dataclasses.replace(
        verdict_for(event_id), filters=(dry, *verdict_for(event_id).filters)
    )
    await insert_verdicts(admin_pool, [verdict])
    r = await admin.get(f"/api/v1/events/{quote(event_id, safe='')}")
    assert r.status_code == 200, r.text
    assert r.json()["filters"] == [
        {
            "name": "many_ats",
            "class": "prohibited",
            "harms": [SPAM],
            "duration_ms": 0.0,
            "dry_run": True,
        },
        *EXPECTED_FILTERS,
    ]

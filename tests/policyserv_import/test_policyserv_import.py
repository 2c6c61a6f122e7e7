"""``warden import-policyserv`` against a policyserv database built here: every kind of
row lands in Warden's tables (or is reported skipped with its reason), a second run
changes nothing, ``--dry-run`` writes nothing, and the source is never changed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from unpaddedbase64 import encode_base64

from tests.policyserv_import.policyserv_db import TABLES, policyserv_database, snapshot
from warden.cli import main
from warden.policy.harms import OTHER
from warden.policyserv_import import SourceError, run_import
from warden.policyserv_import.verdicts import SKIP_V1_V2_NOT_REFUSED
from warden.storage.communities import hash_access_token
from warden.storage.migrations import migrate

SPAM = "org.matrix.msc4456.spam"
FLOODING = "org.matrix.msc4456.spam.flooding"
TOKEN = "pst_alpha-token-kept-across-the-move"
WARDEN_TABLES = ("communities", "rooms", "keyword_templates", "displaynames", "verdicts")


def v4_id() -> str:
    return "$" + encode_base64(os.urandom(32), urlsafe=True)


def v3_id() -> str:
    while True:  # a room v3 ID (standard alphabet) that is not also URL-safe
        raw = encode_base64(os.urandom(32))
        if "+" in raw or "/" in raw:
            return "$" + raw


EVENTS: dict[str, tuple[str, bool, str]] = {
    "harm": (v4_id(), True, '{"h:org.matrix.msc4456.spam": 1.0}'),
    "two_harms": (
        v4_id(),
        True,
        '{"h:org.matrix.msc4456.spam.flooding": 1, "h:org.matrix.msc4456.spam": 1}',
    ),
    "allowed": (v4_id(), False, '{"Allowed": 1.0}'),
    "neutral": (v4_id(), False, "{}"),
    "prohibited_no_harm": (v4_id(), True, "{}"),
    "legacy_vectors_spam": (
        v4_id(),
        True,
        '{"org.matrix.policyserv.vec.spam": 1.0, "org.matrix.policyserv.vec.csam": 0.0}',
    ),
    "legacy_vectors_ok": (v4_id(), False, '{"org.matrix.policyserv.vec.spam": 0.5}'),
    "legacy_reasons": (v4_id(), True, '{"keyword": 1.0}'),
    "room_v3": (v3_id(), True, '{"h:org.matrix.msc4456.spam": 1.0}'),
    "room_v1": ("$a1b2c3:old.example", True, '{"h:org.matrix.msc4456.spam": 1.0}'),
    "room_v1_allowed": ("$d4e5f6:old.example", False, '{"Allowed": 1.0}'),
    "room_v2_neutral": ("$g7h8i9:old.example", False, "{}"),
    "garbled": (v4_id(), True, "{not json"),
}

TEMPLATE_OK = (
    '{{- if StringContains (ToLower .BodyRaw) "free crypto" -}}\n'
    "org.matrix.msc4456.spam\n"
    "{{- end }}"
)
TEMPLATE_RANGE = '{{ range .BodyWords }}{{ if eq . "x" }}org.matrix.msc4456.spam{{ end }}{{ end }}'


def statements() -> list[tuple[str, list[Any]]]:
    out: list[tuple[str, list[Any]]] = [
        (
            "INSERT INTO communities VALUES ($1, $2, $3, $4, $5)",
            [
                "2Nq8zalpha",
                "Alpha",
                orjson.dumps(
                    {
                        "keyword_filter_keywords": ["buy now"],
                        "length_filter_max_length": 5000.0,
                        "mjolnir_filter_enabled": False,
                        "openai_filter_fail_secure": False,
                        "safeguard_filter_policy": "unknown to Warden",
                        "many_ats_filter_max_ats": "lots",
                    }
                ).decode(),
                TOKEN,
                True,
            ],
        ),
        ("INSERT INTO communities VALUES ('2Nq8zbeta', 'Beta', '{}', NULL, FALSE)", []),
        (
            "INSERT INTO rooms VALUES ('!r1:example.org', '10', '@mod:example.org', 1234,"
            " '2Nq8zalpha')",
            [],
        ),
        (
            "INSERT INTO rooms (room_id, room_version, community_id) VALUES"
            " ('!r2:example.org', '12', NULL), ('!odd:example.org', 'weird', 'default')",
            [],
        ),
        (
            "INSERT INTO keyword_templates VALUES ('crypto', $1), ('ranged', $2), ('gone', '')",
            [TEMPLATE_OK, TEMPLATE_RANGE],
        ),
        (
            "INSERT INTO displaynames VALUES ('!r1:example.org', '@alice:example.org', 'Alice'),"
            " ('!r1:example.org', '@bob:example.org', 'Bob'),"
            " ('!r1:example.org', 'not-a-user', 'X'), ('!elsewhere:x', '@c:x', 'C')",
            [],
        ),
        (
            "INSERT INTO ban_rules VALUES ('!policy:example.org', 'user', '@spammer:*')",
            [],
        ),
        (
            "INSERT INTO trust_data VALUES ('muninn_hall', '', '{\"example.org\": true}'),"
            " ('power_levels', '!r1:example.org', '{}')",
            [],
        ),
        (
            "INSERT INTO media_classifications VALUES ('mxc://example.org/abc', 'default',"
            ' \'["Prohibited", "org.matrix.msc4456.child_safety.csam"]\'),'
            " ('mxc://example.org/old', 'default', '[\"org.matrix.msc4456.spam\"]'),"
            " ('mxc://example.org/ok', 'default', '[\"Neutral\"]'),"
            " ('mxc://example.org/none', 'default', NULL)",
            [],
        ),
        ("INSERT INTO state_learn_queue VALUES ('!r1:example.org', '$e', 'example.org', 0)", []),
        ("INSERT INTO destinations VALUES ('example.org', 3)", []),
        ("INSERT INTO destination_edus (destination, edu) VALUES ('example.org', '{}')", []),
    ]
    for event_id, spam, vectors in EVENTS.values():
        out.append(
            (
                "INSERT INTO events VALUES ($1, $2, $3, '2026-01-02 03:04:05')",
                [event_id, spam, vectors],
            )
        )
    return out


@pytest.fixture
async def source() -> AsyncIterator[str]:
    async with policyserv_database(statements()) as url:
        yield url


@pytest.fixture
async def target(empty_pg_database: str) -> str:
    conn = await asyncpg.connect(empty_pg_database)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return empty_pg_database


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def reasons(report: dict[str, Any], kind: str) -> dict[str, int]:
    return {r["reason"]: r["count"] for r in report["kinds"][kind]["skipped_reasons"]}


async def test_import_carries_every_kind_over(source: str, target: str) -> None:
    report = (await run_import(source, target, dry_run=False)).to_dict()
    kinds = report["kinds"]

    communities = {
        r["id"]: r
        for r in await fetch(
            target,
            "SELECT id, name, config::text AS config, can_self_join_rooms,"
            " api_access_token_hash FROM communities",
        )
    }
    alpha = communities["2Nq8zalpha"]
    assert alpha["name"] == "Alpha" and alpha["can_self_join_rooms"] is True
    # The stored hash is the one Warden's token lookup computes: the old token works.
    assert alpha["api_access_token_hash"] == hash_access_token(TOKEN)
    assert orjson.loads(alpha["config"]) == {
        "keyword_filter_keywords": ["buy now"],
        "length_filter_max_length": 5000,
        "mjolnir_filter_enabled": False,
        "openai_filter_fail_secure": False,
    }
    dropped = {(d["community_id"], d["key"]) for d in report["config_keys_dropped"]}
    assert dropped == {
        ("2Nq8zalpha", "safeguard_filter_policy"),
        ("2Nq8zalpha", "many_ats_filter_max_ats"),
    }
    assert communities["2Nq8zbeta"]["api_access_token_hash"] is None
    assert kinds["communities"] == {
        "created": 2,
        "updated": 0,
        "unchanged": 1,
        "skipped": 0,
        "skipped_reasons": [],
    }

    rooms = {
        r["room_id"]: tuple(r.values())[1:]
        for r in await fetch(
            target, "SELECT room_id, room_version, community_id, moderator_user_id FROM rooms"
        )
    }
    assert rooms == {
        "!r1:example.org": ("10", "2Nq8zalpha", "@mod:example.org"),
        "!r2:example.org": ("12", "default", ""),
    }
    assert reasons(report, "rooms") == {"unknown room version 'weird'": 1}

    templates = {
        r["name"]: tuple(r.values())[1:]
        for r in await fetch(
            target,
            "SELECT name, body, enabled, original_body, disabled_reason FROM keyword_templates",
        )
    }
    assert templates["crypto"] == (
        '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
        "org.matrix.msc4456.spam{% endif %}",
        True,
        TEMPLATE_OK,
        None,
    )
    body, enabled, original, why = templates["ranged"]
    assert (body, enabled, original) == ("", False, TEMPLATE_RANGE)
    assert why is not None and "range" in why
    assert "gone" not in templates
    assert [t["name"] for t in report["templates_disabled"]] == ["ranged"]

    names = await fetch(target, "SELECT room_id, user_id, displayname FROM displaynames")
    assert sorted(tuple(r.values()) for r in names) == [
        ("!r1:example.org", "@alice:example.org", "Alice"),
        ("!r1:example.org", "@bob:example.org", "Bob"),
    ]
    assert reasons(report, "displaynames") == {"not a user ID": 1, "its room is not imported": 1}

    verdicts = {
        r["event_id"]: r
        for r in await fetch(
            target,
            "SELECT event_id, class, harms, reference_hash, published, first_seen_ts, filters"
            " FROM verdicts",
        )
    }
    expected = {
        "harm": (2, [SPAM]),
        "two_harms": (2, [SPAM, FLOODING]),
        "allowed": (1, []),
        "neutral": (0, []),
        "prohibited_no_harm": (2, [OTHER]),
        "legacy_vectors_spam": (2, [OTHER]),
        "legacy_vectors_ok": (0, []),
        "legacy_reasons": (2, [OTHER]),
        "room_v3": (2, [SPAM]),
        "room_v1": (2, [SPAM]),
    }
    assert set(verdicts) == {EVENTS[k][0] for k in expected}
    for key, (cls, harms) in expected.items():
        event_id = EVENTS[key][0]
        row = verdicts[event_id]
        assert (row["class"], row["harms"]) == (cls, harms), key
        if key == "room_v1":
            # Its ID names no content: unbound until the first event asked about.
            assert row["reference_hash"] is None
        else:
            # The verdict is bound to the content the event ID names (its reference hash).
            digest = event_id[1:].replace("-", "+").replace("_", "/")
            assert row["reference_hash"] == digest
        assert row["published"] is True  # never sent to the moderator or webhooks
        assert row["first_seen_ts"] == 1767323045000
    legacy = orjson.loads(verdicts[EVENTS["legacy_reasons"][0]]["filters"])
    assert legacy[0]["name"] == "policyserv_import"
    assert legacy[0]["policyserv_reasons"] == ["keyword=1.0"]
    # Room v1/v2 verdicts that allow are not imported: judged afresh, never looser.
    assert reasons(report, "verdicts") == {
        SKIP_V1_V2_NOT_REFUSED: 2,
        "confidence_vectors is not JSON": 1,
    }
    assert report["verdicts_unbound"] == 1
    assert report["verdict_encodings"] == {
        "harms": 5,
        "empty": 2,
        "legacy_vectors": 2,
        "legacy_reasons": 1,
    }

    assert kinds["ban_rules"]["skipped"] == 1
    assert report["ban_rule_rooms"] == ["!policy:example.org"]
    # Trust data: the Muninn Hall directory is carried over; power levels policyserv
    # learned without verifying are not (Warden derives them from verified state).
    assert kinds["trust_data"]["created"] == 1 and kinds["trust_data"]["skipped"] == 1
    assert await fetch(target, "SELECT source_name, key, data::text AS d FROM trust_data") == [
        ("muninn_hall", "", '{"example.org": true}')
    ]
    # Media scan results: class then harms, or harms only (prohibited); NULL skipped.
    assert kinds["media_classifications"]["created"] == 3
    assert kinds["media_classifications"]["skipped"] == 1
    media = await fetch(
        target,
        "SELECT mxc_uri, class, harms, source FROM media_classifications ORDER BY mxc_uri",
    )
    assert media == [
        ("mxc://example.org/abc", 2, ["org.matrix.msc4456.child_safety.csam"], "policyserv_import"),
        ("mxc://example.org/ok", 0, [], "policyserv_import"),
        ("mxc://example.org/old", 2, ["org.matrix.msc4456.spam"], "policyserv_import"),
    ]
    assert kinds["state_learn_queue"]["skipped"] == 1
    assert kinds["destination_edus"]["skipped"] == 1
    assert "did not verify" in next(iter(reasons(report, "trust_data")))
    assert "no classification" in next(iter(reasons(report, "media_classifications")))


async def test_second_run_changes_nothing_and_source_is_never_written(
    source: str, target: str
) -> None:
    source_before = await snapshot(source, TABLES)
    await run_import(source, target, dry_run=False)
    after_first = await snapshot(target, WARDEN_TABLES)

    second = (await run_import(source, target, dry_run=False)).to_dict()

    assert await snapshot(target, WARDEN_TABLES) == after_first
    for kind, counts in second["kinds"].items():
        assert (counts["created"], counts["updated"]) == (0, 0), kind
    assert second["kinds"]["verdicts"]["unchanged"] == 10
    assert second["verdicts_unbound"] == 0
    assert second["kinds"]["communities"]["unchanged"] == 3
    assert second["kinds"]["keyword_templates"]["unchanged"] == 2
    assert second["kinds"]["displaynames"]["unchanged"] == 2
    assert await snapshot(source, TABLES) == source_before


async def test_dry_run_writes_nothing_and_reports_what_it_would_do(
    source: str, target: str
) -> None:
    before = await snapshot(target, WARDEN_TABLES)
    report = (await run_import(source, target, dry_run=True)).to_dict()
    assert await snapshot(target, WARDEN_TABLES) == before
    assert report["dry_run"] is True
    assert report["kinds"]["verdicts"]["created"] == 10
    assert report["kinds"]["communities"]["created"] == 2
    assert report["kinds"]["keyword_templates"]["created"] == 2


async def test_changed_source_rows_update_and_a_verdict_warden_gave_stands(
    source: str, target: str
) -> None:
    await run_import(source, target, dry_run=False)
    conn = await asyncpg.connect(source)
    try:
        await conn.execute("UPDATE communities SET name = 'Alpha 2' WHERE id = '2Nq8zalpha'")
        await conn.execute(
            "UPDATE events SET confidence_vectors = '{\"Allowed\": 1}', is_probably_spam = FALSE"
            " WHERE event_id = $1",
            EVENTS["harm"][0],
        )
    finally:
        await conn.close()
    report = (await run_import(source, target, dry_run=False)).to_dict()
    assert report["kinds"]["communities"]["updated"] == 1
    # v1 allowed, v2 neutral, garbled, and the changed one
    assert report["kinds"]["verdicts"]["skipped"] == 4
    rows = await fetch(
        target, "SELECT class, harms FROM verdicts WHERE event_id = $1", EVENTS["harm"][0]
    )
    assert (rows[0]["class"], rows[0]["harms"]) == (2, [SPAM])  # no verdict flips


async def test_a_token_shared_by_two_communities_opens_only_the_first(
    source: str, target: str
) -> None:
    # policyserv's token index is not unique; Warden's is (one token, one community).
    conn = await asyncpg.connect(source)
    try:
        await conn.execute(
            "UPDATE communities SET api_access_token = $1 WHERE id = '2Nq8zbeta'", TOKEN
        )
    finally:
        await conn.close()
    report = (await run_import(source, target, dry_run=False)).to_dict()
    rows = await fetch(
        target,
        "SELECT id FROM communities WHERE api_access_token_hash = $1",
        hash_access_token(TOKEN),
    )
    assert [r["id"] for r in rows] == ["2Nq8zalpha"]
    assert {
        "community_id": "2Nq8zbeta",
        "key": "api_access_token",
        "reason": "already the token of Warden community 2Nq8zalpha",
    } in report["config_keys_dropped"]
    again = (await run_import(source, target, dry_run=False)).to_dict()
    assert again["kinds"]["communities"]["unchanged"] == 3


async def test_a_database_that_is_not_policyservs_is_refused(source: str, target: str) -> None:
    # A database without policyserv's tables is refused before anything is read or written.
    with pytest.raises(SourceError, match="not a policyserv database"):
        await run_import(target, target, dry_run=False)


def test_cli_prints_json_and_summary(
    source: str, target: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PS_DATABASE", target)
    assert main(["import-policyserv", "--from", source, "--dry-run", "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["kinds"]["rooms"]["created"] == 2
    assert asyncio.run(fetch(target, "SELECT 1 FROM rooms")) == []

    assert main(["import-policyserv", "--from", source]) == 0
    out = capsys.readouterr().out
    assert "rooms: 2 created, 0 updated, 0 unchanged, 1 skipped" in out
    assert "ranged: not translated mechanically" in out
    assert "media_classifications: 3 created" in out
    assert "room v1/v2 refusals imported unbound: 1" in out
    assert TOKEN not in out  # tokens are never printed

    monkeypatch.setenv("PS_DATABASE", "postgresql://postgres@127.0.0.1:5432/no_such_db_here")
    assert main(["import-policyserv", "--from", source]) == 1
    assert "database error" in capsys.readouterr().err

"""``dry_run_filters`` and ``filter_conditions`` through the admin API: checked when
written, refused with 400 naming the bad filter or field, stored normalised."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from tests.admin_api.admin_api_helpers import assert_matrix_error

ROOM = "!room:example.org"


@pytest.mark.parametrize(
    ("config", "prefix", "named"),
    [
        ({"dry_run_filters": ["keyword", "nope"]}, "config.dry_run_filters:", "'nope'"),
        ({"dry_run_filters": ["*", "keyword"]}, "config.dry_run_filters:", '"*"'),
        ({"filter_conditions": {"nope": {}}}, "config.filter_conditions:", "'nope'"),
        (
            {"filter_conditions": {"keyword": {"room": [ROOM]}}},
            "config.filter_conditions.keyword:",
            "'room'",
        ),
        (
            {"filter_conditions": {"keyword": {"sender_servers": ["*" + "?" * 40]}}},
            "config.filter_conditions.keyword.sender_servers:",
            "glob",
        ),
        ({"filter_conditions": ["keyword"]}, "config.filter_conditions:", "JSON object"),
    ],
)
async def test_bad_values_are_400_naming_them(
    admin: httpx.AsyncClient,
    admin_pool: asyncpg.Pool,
    config: dict[str, Any],
    prefix: str,
    named: str,
) -> None:
    r = await admin.patch("/api/v1/communities/default", json={"config": config})
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert message.startswith(prefix) and named in message, message
    # POST .../config (the whole config) names the key without the "config." prefix.
    r = await admin.post("/api/v1/communities/default/config", json=config)
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert message.startswith(prefix.removeprefix("config.")) and named in message, message
    row = await admin_pool.fetchrow("SELECT config FROM communities WHERE id = 'default'")
    assert row is not None and row["config"] == "{}"


async def test_good_values_are_stored(admin: httpx.AsyncClient) -> None:
    config = {
        "dry_run_filters": ["keyword"],
        "filter_conditions": {
            "many_ats": {"room_ids": [ROOM], "not_sender_servers": ["*.example.org"]}
        },
    }
    r = await admin.patch("/api/v1/communities/default", json={"config": config})
    assert r.status_code == 200, r.text
    assert r.json()["config"] == config
    r = await admin.get("/api/v1/communities/default")
    assert r.json()["config"] == config

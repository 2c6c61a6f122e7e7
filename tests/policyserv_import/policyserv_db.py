"""A policyserv database as of its migration 18, built from the schema's description
(policyserv-reference.md §5.1; column types checked against policyserv's migrations)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from tests.conftest import _create_database, _drop_database, _pg_url_for

SCHEMA = """
CREATE TABLE communities (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    config JSONB NOT NULL,
    api_access_token TEXT NULL,
    can_self_join_rooms BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX communities_api_access_token ON communities (api_access_token);
INSERT INTO communities (id, name, config) VALUES ('default', 'Default community', '{}');
CREATE TABLE rooms (
    room_id TEXT NOT NULL PRIMARY KEY,
    room_version TEXT NOT NULL,
    moderator_user_id TEXT NOT NULL DEFAULT '',
    last_state_update_ts BIGINT NOT NULL DEFAULT 0,
    community_id TEXT DEFAULT 'default' REFERENCES communities (id)
);
CREATE TABLE events (
    event_id TEXT NOT NULL PRIMARY KEY,
    is_probably_spam BOOLEAN NOT NULL,
    confidence_vectors TEXT NOT NULL,
    first_seen_ts TIMESTAMP NOT NULL DEFAULT NOW()
);
CREATE TABLE displaynames (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    displayname TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE TABLE ban_rules (
    room_id TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    PRIMARY KEY (room_id, entity_type, entity_id)
);
CREATE TABLE state_learn_queue (
    room_id TEXT NOT NULL PRIMARY KEY,
    at_event_id TEXT NOT NULL,
    via TEXT NOT NULL,
    after_ts BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE trust_data (
    source_name TEXT NOT NULL,
    key TEXT NOT NULL,
    data JSONB NOT NULL,
    PRIMARY KEY (source_name, key)
);
CREATE TABLE keyword_templates (name TEXT NOT NULL PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE media_classifications (
    mxc_uri TEXT NOT NULL,
    community_id TEXT NOT NULL REFERENCES communities (id),
    classifications JSONB NULL,
    PRIMARY KEY (mxc_uri, community_id)
);
CREATE TABLE destinations (
    destination TEXT NOT NULL PRIMARY KEY,
    last_transaction_id BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE destination_edus (
    id BIGSERIAL PRIMARY KEY,
    destination TEXT NOT NULL REFERENCES destinations (destination) ON DELETE CASCADE,
    edu JSONB NOT NULL
);
"""

TABLES = (
    "communities",
    "rooms",
    "events",
    "displaynames",
    "ban_rules",
    "state_learn_queue",
    "trust_data",
    "keyword_templates",
    "media_classifications",
    "destinations",
    "destination_edus",
)


@asynccontextmanager
async def policyserv_database(
    statements: Sequence[tuple[str, Sequence[Any]]],
) -> AsyncIterator[str]:
    """A fresh policyserv database with these ``(sql, args)`` run after the schema."""
    name = f"policyserv_test_{uuid.uuid4().hex[:12]}"
    await _create_database(name)
    url = _pg_url_for(name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(SCHEMA)
            for sql, args in statements:
                await conn.execute(sql, *args)
        finally:
            await conn.close()
        yield url
    finally:
        await _drop_database(name)


async def snapshot(url: str, tables: Sequence[str]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of these tables, sorted: to compare a database before and after."""
    conn = await asyncpg.connect(url)
    try:
        out = {}
        for table in tables:
            rows = await conn.fetch(f"SELECT * FROM {table}")
            out[table] = sorted(tuple(str(v) for v in r.values()) for r in rows)
        return out
    finally:
        await conn.close()

"""The ``keyword_templates`` table: named template programs the keyword-template filter runs.

A row with ``enabled = false`` (a policyserv template that could not be translated) is
kept for the operator but never runs: ``load_enabled`` skips it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

_COLUMNS = "name, body, enabled, original_body, disabled_reason, updated_ts"


@dataclass(frozen=True)
class KeywordTemplateRow:
    """One stored template."""

    name: str
    body: str
    enabled: bool
    original_body: str | None
    disabled_reason: str | None
    updated_ts: int


def _row(record: asyncpg.Record) -> KeywordTemplateRow:
    return KeywordTemplateRow(
        name=record["name"],
        body=record["body"],
        enabled=record["enabled"],
        original_body=record["original_body"],
        disabled_reason=record["disabled_reason"],
        updated_ts=record["updated_ts"],
    )


async def get_template(pool: asyncpg.Pool, name: str) -> KeywordTemplateRow | None:
    """The template called ``name``, or None."""
    record = await pool.fetchrow(f"SELECT {_COLUMNS} FROM keyword_templates WHERE name = $1", name)
    return _row(record) if record else None


async def put_template(pool: asyncpg.Pool, name: str, body: str) -> KeywordTemplateRow:
    """Store (create or replace) a template; an uploaded template is always enabled."""
    record = await pool.fetchrow(
        f"""
        INSERT INTO keyword_templates (name, body, enabled, original_body, disabled_reason,
                                       updated_ts)
        VALUES ($1, $2, TRUE, NULL, NULL, (extract(epoch from now()) * 1000)::bigint)
        ON CONFLICT (name) DO UPDATE SET
            body = EXCLUDED.body, enabled = TRUE, original_body = NULL,
            disabled_reason = NULL, updated_ts = EXCLUDED.updated_ts
        RETURNING {_COLUMNS}
        """,
        name,
        body,
    )
    assert record is not None
    return _row(record)


async def delete_template(pool: asyncpg.Pool, name: str) -> bool:
    """Delete a template; False when there was none."""
    status: str = await pool.execute("DELETE FROM keyword_templates WHERE name = $1", name)
    return status != "DELETE 0"


async def load_enabled(
    pool: asyncpg.Pool, names: Sequence[str] | None = None
) -> dict[str, KeywordTemplateRow]:
    """Enabled templates by name: those in ``names``, or every one when None."""
    if names is None:
        records = await pool.fetch(
            f"SELECT {_COLUMNS} FROM keyword_templates WHERE enabled ORDER BY name"
        )
    else:
        records = await pool.fetch(
            f"SELECT {_COLUMNS} FROM keyword_templates WHERE enabled AND name = ANY($1::text[])",
            list(names),
        )
    return {r["name"]: _row(r) for r in records}

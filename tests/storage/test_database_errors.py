"""PostgreSQL's failures are declared once (``warden.storage.database.DATABASE_ERRORS``).

Fourteen modules each listed asyncpg's errors by hand and only the filter worker's
outbox knew every kind: asyncpg's
``InternalClientError`` on a connection cut by a restarting server ended the moderator's
command sender, turned ``/sign`` into a 500 and a filter's failure into a refusal.
"""

from __future__ import annotations

import ast
from pathlib import Path

import asyncpg

from warden.storage.database import DATABASE_ERRORS

ROOT = Path(__file__).resolve().parents[2]
DECLARED_IN = ROOT / "libs" / "warden" / "storage" / "database.py"
ASYNCPG_FAILURES = {"PostgresError", "InterfaceError", "InternalClientError"}


def _names(node: ast.AST) -> set[str]:
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name)
    }


def test_every_kind_of_cut_or_refused_connection_is_a_database_error() -> None:
    for error in (
        asyncpg.exceptions.InternalClientError("cannot switch to state 12"),
        asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"),
        asyncpg.InterfaceError("pool is closing"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(),
        TimeoutError(),
    ):
        assert isinstance(error, DATABASE_ERRORS), type(error)
    assert not isinstance(ValueError("a bug"), DATABASE_ERRORS)


def test_no_module_lists_asyncpgs_errors_itself() -> None:
    """Catch sites and error tuples use ``DATABASE_ERRORS``; only classification by
    SQLSTATE (``warden.policy.dependency_failures``, an ``isinstance`` chain) names
    asyncpg's classes."""
    offenders = []
    for path in sorted(
        [*ROOT.joinpath("libs").rglob("*.py"), *ROOT.joinpath("services").rglob("*.py")]
    ):
        if path == DECLARED_IN or ".venv" in path.parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            listed: ast.expr | None = None
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                listed = node.type
            elif isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Tuple):
                listed = node.value
            if listed is not None and _names(listed) & ASYNCPG_FAILURES:
                offenders.append(f"{path.relative_to(ROOT)}:{listed.lineno}")
    assert not offenders, f"use warden.storage.database.DATABASE_ERRORS: {offenders}"

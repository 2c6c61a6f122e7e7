"""Helpers shared by the admin API tests (fixtures are in this folder's conftest)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
import httpx
import orjson
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from starlette.exceptions import HTTPException

from warden.matrix.errors import MatrixError
from warden_gateway.admin_api import build_admin_router, install_admin_error_handlers
from warden_gateway.errors import on_http_exception, on_matrix_error, on_unexpected

API_KEY = "test-admin-key-\u00e9"  # non-ASCII on purpose: compared as UTF-8 bytes
AUTH = {"Authorization": b"Bearer " + API_KEY.encode()}

PG_ADMIN = os.environ.get("WARDEN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS_URL = os.environ.get("WARDEN_TEST_NATS", "nats://127.0.0.1:4222")


def build_test_app(api_key: str, pool: asyncpg.Pool, nc: NATS) -> FastAPI:
    """An app wired like ``warden_gateway.app.build_app`` wires the admin router."""
    app = FastAPI(openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None)
    app.include_router(build_admin_router(api_key=api_key, pool=pool, nats=nc))
    app.add_exception_handler(MatrixError, on_matrix_error)
    app.add_exception_handler(HTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)
    install_admin_error_handlers(app)
    return app


def client_for(app: FastAPI, headers: dict[str, Any] | None = None) -> httpx.AsyncClient:
    """An HTTP client on the app; server errors come back as responses, not exceptions."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://admin", headers=headers)


async def reset_database(pool: asyncpg.Pool) -> None:
    """Back to the migrated state: the default community with an empty config only."""
    await pool.execute("TRUNCATE rooms, verdicts")
    await pool.execute("DELETE FROM communities WHERE id <> 'default'")
    await pool.execute(
        "UPDATE communities SET config = '{}'::jsonb, can_self_join_rooms = false,"
        " name = 'Default community' WHERE id = 'default'"
    )


class ConfigChanges:
    """Messages received on CONFIG_CHANGED_SUBJECT through a separate NATS connection."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_message(self, msg: Msg) -> None:
        self.queue.put_nowait(orjson.loads(msg.data))

    async def expect(self, change: dict[str, str]) -> None:
        """Wait for ``change`` (other test runs may publish unrelated changes meanwhile).

        The bound only keeps a missing message from hanging the test; it asserts nothing
        about speed.
        """
        async with asyncio.timeout(10):
            while True:
                if await self.queue.get() == change:
                    return

    def drain(self) -> list[dict[str, Any]]:
        """Everything received so far."""
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


def assert_matrix_error(response: httpx.Response, status: int, errcode: str) -> str:
    """Check a Matrix error response; return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["errcode"] == errcode, body
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])

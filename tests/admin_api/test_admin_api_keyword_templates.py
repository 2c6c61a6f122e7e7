"""``/api/v1/keyword_templates/{name}``: upload, read, delete, compile errors, bounds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.admin_api.admin_api_helpers import assert_matrix_error
from warden.bus.subjects import KEYWORD_TEMPLATES_CHANGED_SUBJECT
from warden.policy.keyword_template_language import MAX_TEMPLATE_BYTES

TEMPLATE = (
    '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
    "org.matrix.msc4456.spam.fraud{% endif %}"
)
TEXT = {"Content-Type": "text/plain"}


class Notifications:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_message(self, msg: Msg) -> None:
        self.queue.put_nowait(orjson.loads(msg.data))

    async def expect(self, body: dict[str, Any]) -> None:
        """Wait for ``body``; the bound only keeps a lost message from hanging the test."""
        async with asyncio.timeout(10):
            while await self.queue.get() != body:
                pass


@pytest.fixture
async def notifications(nats_client: NATS) -> AsyncIterator[Notifications]:
    n = Notifications()
    sub = await nats_client.subscribe(KEYWORD_TEMPLATES_CHANGED_SUBJECT, cb=n.on_message)
    await nats_client.flush()
    try:
        yield n
    finally:
        await sub.unsubscribe()


def new_name() -> str:
    return f"tpl-{uuid.uuid4().hex[:8]}"


async def test_upload_get_replace_delete(
    admin: httpx.AsyncClient, notifications: Notifications
) -> None:
    name = new_name()
    path = f"/api/v1/keyword_templates/{name}"
    assert_matrix_error(await admin.get(path), 404, "M_NOT_FOUND")

    r = await admin.post(path, content=TEMPLATE, headers=TEXT)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": name, "body": TEMPLATE}
    await notifications.expect({"name": name})
    r = await admin.get(path)
    assert r.status_code == 200 and r.json() == {"name": name, "body": TEMPLATE}

    # Replaced in place; the raw body is taken whatever the Content-Type (or none).
    r = await admin.post(path, content=b"org.matrix.msc4456.spam")
    assert r.json() == {"name": name, "body": "org.matrix.msc4456.spam"}
    await notifications.expect({"name": name})
    assert (await admin.get(path)).json()["body"] == "org.matrix.msc4456.spam"

    # An empty body stores an empty template (it outputs nothing), as policyserv.
    r = await admin.post(path, content=b"")
    assert r.status_code == 200 and r.json() == {"name": name, "body": ""}
    await notifications.expect({"name": name})

    r = await admin.delete(path)
    assert r.status_code == 200 and r.json() == {}
    await notifications.expect({"name": name})
    assert_matrix_error(await admin.get(path), 404, "M_NOT_FOUND")
    assert_matrix_error(await admin.delete(path), 404, "M_NOT_FOUND")


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("{% if %}", 1),
        ("one\ntwo\n{% for w in BodyWords %}\nno end", 3),
        ("ok\n{{ ''.__class__ }}", 2),
        ("{% macro f() %}{% endmacro %}", 1),
    ],
)
async def test_compile_errors_are_400_naming_the_line(
    admin: httpx.AsyncClient, body: str, line: int
) -> None:
    name = new_name()
    path = f"/api/v1/keyword_templates/{name}"
    r = await admin.post(path, content=body, headers=TEXT)
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert f"line {line}:" in message
    assert_matrix_error(await admin.get(path), 404, "M_NOT_FOUND")  # nothing stored


async def test_deeply_nested_templates_are_400(admin: httpx.AsyncClient) -> None:
    body = "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"
    r = await admin.post(f"/api/v1/keyword_templates/{new_name()}", content=body)
    assert "nested too deeply" in assert_matrix_error(r, 400, "M_BAD_JSON")


async def test_an_edit_with_an_error_keeps_the_stored_template(admin: httpx.AsyncClient) -> None:
    path = f"/api/v1/keyword_templates/{new_name()}"
    assert (await admin.post(path, content=TEMPLATE)).status_code == 200
    assert_matrix_error(await admin.post(path, content="{% if %}"), 400, "M_BAD_JSON")
    assert (await admin.get(path)).json()["body"] == TEMPLATE


async def test_bodies_are_bounded_and_must_be_utf8(admin: httpx.AsyncClient) -> None:
    path = f"/api/v1/keyword_templates/{new_name()}"
    r = await admin.post(path, content=b"x" * (MAX_TEMPLATE_BYTES + 1))
    assert_matrix_error(r, 413, "M_TOO_LARGE")
    r = await admin.post(path, content=b"\xff\xfe")
    assert_matrix_error(r, 400, "M_BAD_JSON")
    assert_matrix_error(await admin.get(path), 404, "M_NOT_FOUND")
    # Exactly at the bound is fine.
    r = await admin.post(path, content=b"x" * MAX_TEMPLATE_BYTES)
    assert r.status_code == 200


async def test_names_are_checked(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/api/v1/keyword_templates/" + "n" * 256)
    assert_matrix_error(r, 400, "M_INVALID_PARAM")
    r = await admin.post("/api/v1/keyword_templates/a%20b", content="x")
    assert_matrix_error(r, 400, "M_INVALID_PARAM")


async def test_the_api_key_is_required(anonymous: httpx.AsyncClient) -> None:
    path = f"/api/v1/keyword_templates/{new_name()}"
    for r in (
        await anonymous.get(path),
        await anonymous.post(path, content=TEMPLATE),
        await anonymous.delete(path),
    ):
        assert_matrix_error(r, 401, "M_UNAUTHORIZED")


async def test_documented_in_openapi(admin: httpx.AsyncClient) -> None:
    doc = (await admin.get("/api/v1/openapi.json")).json()
    ops = doc["paths"]["/api/v1/keyword_templates/{name}"]
    assert set(ops) == {"get", "post", "delete"}
    assert "text/plain" in ops["post"]["requestBody"]["content"]

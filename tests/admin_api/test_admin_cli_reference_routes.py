"""``warden admin`` for join/leave (which need federation) and for what a policyserv
reference server answers (its rotation shows the old token): against a small real HTTP
server that answers as policyserv's reference describes (§4.3), recording what the CLI
sent. The other commands run against the real admin app in ``test_admin_cli.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.local_servers import start_threaded, stop_all
from warden.admin_cli.client import default_url
from warden.cli import main

KEY = "reference-key"
ROOM = "!abc/def:example.org"  # a "/" in the ID must reach the server as one segment


class ReferenceAdmin:
    """The admin API as policyserv's reference answers these routes."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes, str]] = []
        self.templates: dict[str, str] = {}
        self.token = ""
        self.app = Starlette(
            routes=[
                Route(
                    "/api/v1/communities/{cid}/rotate_access_token",
                    self.rotate,
                    methods=["POST"],
                ),
                Route("/api/v1/keyword_templates/{name}", self.template, methods=["GET", "POST"]),
                Route("/api/v1/rooms/{room_id:path}/join", self.join, methods=["POST"]),
                Route("/api/v1/rooms/{room_id:path}/leave", self.leave, methods=["POST"]),
            ]
        )

    async def _record(self, request: Request) -> Response | None:
        body = await request.body()
        path = request.scope["raw_path"].decode()
        self.requests.append((request.method, path, body, request.headers.get("content-type", "")))
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"errcode": "M_UNAUTHORIZED", "error": "Bad key"}, 401)
        return None

    async def rotate(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        if request.path_params["cid"] != "c1":
            return JSONResponse({"errcode": "M_NOT_FOUND", "error": "Community not found"}, 404)
        old, self.token = self.token, f"pst_{len(self.requests)}secret"
        return JSONResponse({"old_access_token": old, "new_access_token": self.token})

    async def template(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        name = request.path_params["name"]
        if request.method == "POST":
            self.templates[name] = (await request.body()).decode()
        elif name not in self.templates:
            return JSONResponse({"errcode": "M_NOT_FOUND", "error": "Template not found"}, 404)
        return JSONResponse({"name": name, "body": self.templates[name]})

    async def join(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        body: dict[str, Any] = orjson.loads(await request.body())
        return JSONResponse(
            {
                "room_id": request.path_params["room_id"],
                "room_version": "12",
                "moderator_user_id": "",
                "last_cached_state_timestamp": 1_700_000_000_000,
                "community_id": body["community_id"],
                "policy_server": {
                    "uses_warden": True,
                    "via": "warden.test",
                    "public_key": "abc",
                    "key_matches": True,
                },
            }
        )

    async def leave(self, request: Request) -> Response:
        if (refused := await self._record(request)) is not None:
            return refused
        return JSONResponse({})


@pytest.fixture
async def reference(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[ReferenceAdmin, str]]:
    monkeypatch.setenv("PS_API_KEY", KEY)
    ref = ReferenceAdmin()
    server = await start_threaded(ref.app)
    # The URL from the environment this time, not --url.
    monkeypatch.setenv("WARDEN_ADMIN_URL", server.base_url)
    try:
        yield ref, server.base_url
    finally:
        stop_all([server])


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = await asyncio.to_thread(main, ["admin", *argv])
    out, err = capsys.readouterr()
    return status, out, err


async def test_rooms_join_and_leave(
    reference: tuple[ReferenceAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    ref, _ = reference
    status, out, err = await run(
        capsys,
        "rooms",
        "join",
        ROOM,
        "--community",
        "c1",
        "--via",
        "a.example",
        "--via",
        "b.example",
    )
    assert (status, err) == (0, "")
    method, path, body, _ = ref.requests[-1]
    assert (method, path) == ("POST", "/api/v1/rooms/%21abc%2Fdef%3Aexample.org/join")
    assert orjson.loads(body) == {"community_id": "c1", "via": ["a.example", "b.example"]}
    assert f"room:                {ROOM}" in out
    assert "with Warden's key:   yes" in out
    status, out, err = await run(capsys, "rooms", "leave", ROOM)
    assert (status, err) == (0, "")
    assert out == f"left {ROOM}; it is no longer protected\n"
    assert ref.requests[-1][1:3] == ("/api/v1/rooms/%21abc%2Fdef%3Aexample.org/leave", b"{}")


async def test_the_key_goes_to_the_server(
    reference: tuple[ReferenceAdmin, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PS_API_KEY", "wrong")
    status, _, err = await run(capsys, "templates", "show", "x")
    assert status == 1
    assert err == "warden admin: M_UNAUTHORIZED: Bad key (HTTP 401)\n"


async def test_set_config_from_a_file_and_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused before any request: no server is needed (the URL leads nowhere).
    monkeypatch.setenv("PS_API_KEY", KEY)
    monkeypatch.setenv("WARDEN_ADMIN_URL", "http://127.0.0.1:9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    status, out, err = await run(capsys, "communities", "set-config", "c1", "--from-file", str(bad))
    assert (status, out) == (2, "")
    assert err.startswith(f"warden admin: {bad}: not JSON (")
    assert err.count("\n") == 1
    status, _, err = await run(capsys, "communities", "set-config", "c1", "no-equals-sign")
    assert status == 2
    assert err == "warden admin: 'no-equals-sign' is not KEY=VALUE\n"
    status, _, err = await run(capsys, "communities", "set-config", "c1")
    assert status == 2
    assert "nothing to change" in err


def test_the_default_url_follows_the_admin_listener() -> None:
    assert default_url({}) == "http://127.0.0.1:8080"
    assert default_url({"PS_HTTP_BIND": "[::]:9000"}) == "http://[::1]:9000"
    both = {"PS_HTTP_BIND": "0.0.0.0:8080", "PS_ADMIN_HTTP_BIND": "10.0.0.5:8082"}
    assert default_url(both) == "http://10.0.0.5:8082"
    assert default_url({**both, "WARDEN_ADMIN_URL": "https://admin.example"}) == (
        "https://admin.example"
    )

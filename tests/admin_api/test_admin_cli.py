"""``warden admin``: the command line against the real admin API on a local port.

The admin app is the one the other admin API tests build (real PostgreSQL and NATS),
served by uvicorn on 127.0.0.1 in the test's event loop; the CLI runs in a thread (its
``main``) or as a process of its own, and talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

from tests.admin_api.admin_api_helpers import API_KEY
from tests.admin_api.test_admin_api_events import real_event_id, verdict_for
from warden.cli import main
from warden.policy.harms import SPAM
from warden.storage.verdicts import insert_verdicts

ROOM = "!cli-room:example.org"


class _Server(uvicorn.Server):
    """Leaves SIGINT/SIGTERM to pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@pytest.fixture
async def admin_url(admin_app: FastAPI) -> AsyncIterator[str]:
    """The admin app served on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(admin_app, log_level="warning", lifespan="off", access_log=False)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with asyncio.timeout(10):  # only keeps a broken start from hanging the test
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(autouse=True)
def api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_API_KEY", API_KEY)  # non-ASCII: sent as UTF-8 bytes
    monkeypatch.delenv("WARDEN_ADMIN_URL", raising=False)


class Cli:
    """Runs ``warden admin --url <admin_url> ...`` in a thread; returns (status, out, err)."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = await asyncio.to_thread(main, ["admin", "--url", self.url, *argv])
        out, err = self.capsys.readouterr()
        return status, out, err

    async def ok(self, *argv: str) -> str:
        status, out, err = await self(*argv)
        assert status == 0, err
        assert err == ""
        return out

    async def json(self, *argv: str) -> object:
        return orjson.loads(await self.ok(*argv, "--json"))


@pytest.fixture
def cli(admin_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(admin_url, capsys)


def rows_of(table: str) -> list[list[str]]:
    """A printed table's data rows, split on runs of two or more spaces."""
    lines = table.strip().splitlines()
    assert set(lines[1].replace(" ", "")) == {"-"}, table  # the rule under the headers
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


async def test_communities_create_list_show_and_set_config(cli: Cli) -> None:
    created = await cli.json("communities", "create", "Cats of the Internet")
    assert isinstance(created, dict)
    community_id = created["community_id"]
    assert created == {
        "community_id": community_id,
        "name": "Cats of the Internet",
        "config": {},
        "can_self_join_rooms": False,
    }
    out = await cli.ok("communities", "create", "Dogs of the Internet")
    assert "name:" in out and "Dogs of the Internet" in out
    assert "no overrides" in out

    listed = await cli.json("communities", "list")
    assert isinstance(listed, list)
    names = {c["community_id"]: c["name"] for c in listed}
    assert names[community_id] == "Cats of the Internet"
    assert names["default"] == "Default community"
    assert len(listed) == 3
    table = await cli.ok("communities", "list")
    assert table.splitlines()[0].split() == ["COMMUNITY", "NAME", "SELF-JOIN", "OVERRIDES"]
    assert [community_id, "Cats of the Internet", "no", "0"] in rows_of(table)

    # Merge keys in: JSON values keep their type, anything else is text.
    changed = await cli.json(
        "communities",
        "set-config",
        community_id,
        'keyword_filter_keywords=["kibble", "free tuna"]',
        "spam_threshold=0.6",
        "webhook_url=https://element.ems.host/hook",
    )
    assert isinstance(changed, dict)
    assert changed["config"] == {
        "keyword_filter_keywords": ["kibble", "free tuna"],
        "spam_threshold": 0.6,
        "webhook_url": "https://element.ems.host/hook",
    }
    shown = await cli.ok("communities", "show", community_id)
    assert f"community:           {community_id}" in shown
    assert ["keyword_filter_keywords", "kibble, free tuna"] in rows_of(
        shown.split("overrides:\n")[1]
    )
    assert ["spam_threshold", "0.6"] in rows_of(shown.split("overrides:\n")[1])

    # --unset removes one override; the others stay.
    changed = await cli.json("communities", "set-config", community_id, "--unset", "spam_threshold")
    assert isinstance(changed, dict)
    assert set(changed["config"]) == {"keyword_filter_keywords", "webhook_url"}

    # --replace replaces the whole config.
    changed = await cli.json(
        "communities", "set-config", community_id, "mention_filter_max_mentions=3", "--replace"
    )
    assert isinstance(changed, dict)
    assert changed["config"] == {"mention_filter_max_mentions": 3}
    assert await cli.json("communities", "show", community_id) == changed


async def test_rooms_protect_list_and_show(cli: Cli) -> None:
    assert await cli.ok("rooms", "list") == "(none)\n"
    assert await cli.json("rooms", "list") == []
    community = await cli.json("communities", "create", "Room owners")
    assert isinstance(community, dict)
    out = await cli.ok(
        "rooms", "protect", ROOM, "--community", community["community_id"], "--room-version", "11"
    )
    assert f"room:          {ROOM}" in out
    room = await cli.json("rooms", "show", ROOM)
    assert room == {
        "room_id": ROOM,
        "room_version": "11",
        "moderator_user_id": "",
        "last_cached_state_timestamp": 0,
        "community_id": community["community_id"],
        "policy_server": {
            "uses_warden": False,
            "via": None,
            "public_key": None,
            "key_matches": False,
        },
    }
    table = await cli.ok("rooms", "list")
    assert table.splitlines()[0].split() == [
        "ROOM",
        "VERSION",
        "COMMUNITY",
        "MODERATOR",
        "STATE",
        "LEARNED",
    ]
    assert rows_of(table) == [[ROOM, "11", community["community_id"], "-", "never"]]
    shown = await cli.ok("rooms", "show", ROOM)
    assert "names Warden:" in shown and "policy server named: -" in shown


async def test_verdict_shows_every_filter(cli: Cli, admin_pool: asyncpg.Pool) -> None:
    event_id = real_event_id("3", "/+")  # a slash in the ID must survive the URL
    await insert_verdicts(admin_pool, [verdict_for(event_id)])
    out = await cli.ok("verdict", event_id)
    assert f"event:           {event_id}" in out
    assert "verdict:         prohibited (refused)" in out
    assert f"harms:           {SPAM}" in out
    assert "refused by:      keyword" in out
    assert "filters failed:  media" in out
    filters = rows_of(out.split("filters:\n")[1])
    assert filters == [
        ["event_type_prefilter", "neutral", "-", "0.01", "-"],
        ["keyword", "prohibited", SPAM, "1.25", "-"],
        ["media", "neutral", "-", "5000.00", "timed out"],
    ]
    as_json = await cli.json("verdict", event_id)
    assert isinstance(as_json, dict)
    assert as_json["class"] == "prohibited"
    assert [f["name"] for f in as_json["filters"]] == ["event_type_prefilter", "keyword", "media"]
    assert as_json["filters"][2]["error"] == "timed out"


async def test_errors_are_one_line_with_the_errcode(cli: Cli) -> None:
    status, out, err = await cli("communities", "show", "no-such-community")
    assert (status, out) == (1, "")
    assert err == "warden admin: M_NOT_FOUND: Unknown community (HTTP 404)\n"

    status, out, err = await cli("communities", "set-config", "default", "no_such_key=1")
    assert (status, out) == (1, "")
    assert err.startswith("warden admin: M_BAD_JSON: ")
    assert "no_such_key" in err
    assert err.count("\n") == 1

    status, _, err = await cli("verdict", "$never-judged")
    assert status == 1
    assert err.startswith("warden admin: M_NOT_FOUND: ")


async def test_a_wrong_key_is_refused(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_API_KEY", "not-the-key")
    status, _, err = await cli("rooms", "list")
    assert status == 1
    assert err.startswith("warden admin: M_UNAUTHORIZED: ")
    assert err.endswith("(HTTP 401)\n")
    monkeypatch.delenv("PS_API_KEY")
    status, _, err = await cli("rooms", "list")
    assert status == 2
    assert "PS_API_KEY is not set" in err


async def test_an_unreachable_api_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    status = await asyncio.to_thread(
        main, ["admin", "--url", f"http://127.0.0.1:{port}", "rooms", "list"]
    )
    _, err = capsys.readouterr()
    assert status == 1
    assert err.startswith(f"warden admin: CONNECTION_FAILED: http://127.0.0.1:{port}: ")
    assert err.count("\n") == 1


async def test_the_console_command_exits_non_zero_on_an_error(admin_url: str) -> None:
    # A process of its own, as an operator runs it: the exit status and stderr are real.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden",
        "admin",
        "communities",
        "show",
        "missing",
        "--url",
        admin_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 1
    assert out == b""
    assert err == b"warden admin: M_NOT_FOUND: Unknown community (HTTP 404)\n"


async def test_rotate_token_against_the_real_api(cli: Cli, admin_pool: asyncpg.Pool) -> None:
    from warden.storage.communities import hash_access_token

    created = await cli.json("communities", "create", "Tokens")
    assert isinstance(created, dict)
    cid = created["community_id"]
    out = await cli.ok("communities", "rotate-token", cid)
    token = re.search(r"new access token:\s+(pst_\S+)", out)
    assert token is not None, out
    assert re.search(r"old token:\s+\(none\)", out), out
    stored = await admin_pool.fetchval(
        "SELECT api_access_token_hash FROM communities WHERE id = $1", cid
    )
    assert stored == hash_access_token(token.group(1))
    again = await cli.json("communities", "rotate-token", cid)
    assert isinstance(again, dict)
    assert again["had_access_token"] is True and again["new_access_token"] != token.group(1)
    out = await cli.ok("communities", "rotate-token", cid)
    assert "revoked (not shown" in out
    status, out, err = await cli("communities", "rotate-token", "nope")
    assert (status, out) == (1, "")
    assert err.startswith("warden admin: M_NOT_FOUND: ")


async def test_templates_upload_and_show_against_the_real_api(cli: Cli, tmp_path: Path) -> None:
    text = (
        '{% if StringContains(ToLower(BodyRaw), "free crypto") %}'
        "org.matrix.msc4456.spam{% endif %}\n"
    )
    source = tmp_path / "scams.j2"
    source.write_text(text, encoding="utf-8")
    out = await cli.ok("templates", "upload", "scams", str(source))
    assert out.startswith("template scams: stored")
    assert await cli.ok("templates", "show", "scams") == text + "\n"
    assert await cli.json("templates", "show", "scams") == {"name": "scams", "body": text}
    bad = tmp_path / "bad.j2"
    bad.write_text("{% if %}", encoding="utf-8")
    status, _, err = await cli("templates", "upload", "bad", str(bad))
    assert status == 1
    assert err.startswith("warden admin: M_BAD_JSON: ") and "line 1" in err
    status, out, err = await cli("templates", "show", "other")
    assert (status, out) == (1, "")
    assert err.startswith("warden admin: M_NOT_FOUND: ")


async def test_a_community_id_starting_with_a_dash_goes_after_a_double_dash(
    cli: Cli, admin_pool: asyncpg.Pool
) -> None:
    # IDs of earlier versions started with "-" one time in 64 (new ones never do, see
    # tests/storage/test_community_ids.py); the command line reads it after "--".
    from warden.storage.communities import create_community

    cid = f"-legacy{uuid.uuid4().hex[:12]}"
    await create_community(admin_pool, "Dashed", community_id=cid)
    with pytest.raises(SystemExit) as exited:  # argparse: a bad command line
        await cli("communities", "show", cid)
    assert exited.value.code == 2
    shown = orjson.loads(await cli.ok("communities", "show", "--json", "--", cid))
    assert isinstance(shown, dict) and shown["community_id"] == cid
    out = await cli.ok("communities", "rotate-token", "--", cid)
    assert re.search(r"new access token:\s+pst_\S+", out), out

"""Communities: create, read, patch (merge), replace the config, instance defaults."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from nats.aio.client import Client as NATS

from tests.admin_api.admin_api_helpers import (
    API_KEY,
    AUTH,
    ConfigChanges,
    assert_matrix_error,
    build_test_app,
    client_for,
)
from warden.policy import config as policy_config
from warden.policy.config import ConfigKey, known_keys

# A key only the operator may set. None is declared yet, so the tests add one for their
# duration (and remove it after, so other tests see the real registry).
SECRET_KEY = "admin_api_test_instance_secret"


@pytest.fixture
def instance_only_key(monkeypatch: pytest.MonkeyPatch) -> str:
    known_keys()  # load every filter's keys first
    monkeypatch.setitem(
        policy_config._KEYS,
        SECRET_KEY,
        ConfigKey(SECRET_KEY, "str", "", "a test secret", instance_only=True),
    )
    return SECRET_KEY


async def new_community(admin: httpx.AsyncClient, name: str = "Test community") -> str:
    r = await admin.post("/api/v1/communities/new", json={"name": name})
    assert r.status_code == 200, r.text
    return str(r.json()["community_id"])


async def test_create_trims_the_name_and_starts_with_an_empty_config(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool
) -> None:
    r = await admin.post("/api/v1/communities/new", json={"name": "  Matrix HQ \n"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"community_id", "name", "config", "can_self_join_rooms"}
    assert body["name"] == "Matrix HQ"
    assert body["config"] == {}
    assert body["can_self_join_rooms"] is False
    # IDs are random and unguessable, and stored.
    other = await new_community(admin)
    assert other != body["community_id"] and len(other) >= 20
    stored = await admin_pool.fetchrow(
        "SELECT name, api_access_token_hash FROM communities WHERE id = $1", body["community_id"]
    )
    assert stored is not None and stored["name"] == "Matrix HQ"
    r = await admin.get(f"/api/v1/communities/{body['community_id']}")
    assert r.status_code == 200
    assert r.json() == body


@pytest.mark.parametrize("name", ["abc", "  abc  ", "x" * 255, "é" * 255, " " + "y" * 255 + " "])
async def test_names_of_3_to_255_characters_after_trimming_are_accepted(
    admin: httpx.AsyncClient, name: str
) -> None:
    r = await admin.post("/api/v1/communities/new", json={"name": name})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name.strip()


@pytest.mark.parametrize("name", ["", "ab", "   ab   ", "\t\n", "x" * 256])
async def test_names_outside_3_to_255_are_refused_naming_the_field(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, name: str
) -> None:
    r = await admin.post("/api/v1/communities/new", json={"name": name})
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert message.startswith("name:")
    assert await admin_pool.fetchval("SELECT count(*) FROM communities") == 1


@pytest.mark.parametrize("body", [{}, {"name": 5}, {"name": None}, {"name": ["abc"]}])
async def test_a_missing_or_mistyped_name_is_refused(
    admin: httpx.AsyncClient, body: dict[str, object]
) -> None:
    r = await admin.post("/api/v1/communities/new", json=body)
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith("name:")


async def test_non_json_bodies_are_m_not_json(admin: httpx.AsyncClient) -> None:
    cases: list[tuple[bytes, str | None]] = [
        (b"{", "application/json"),
        (b'{"name": "abc"', "application/json"),
        (b"\xff\xfe{}", "application/json"),
        (b'{"name": "abc"}', "text/plain"),
        (b"", "application/json"),
    ]
    for content, content_type in cases:
        headers = {"Content-Type": content_type} if content_type else {}
        r = await admin.post("/api/v1/communities/new", content=content, headers=headers)
        assert_matrix_error(r, 400, "M_NOT_JSON")
    # JSON that is not an object is well-formed JSON of the wrong shape.
    for content in (b"[]", b'"abc"', b"3", b"null"):
        r = await admin.post(
            "/api/v1/communities/new",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert_matrix_error(r, 400, "M_BAD_JSON")


async def test_a_body_without_content_type_is_taken_as_json(admin: httpx.AsyncClient) -> None:
    request = admin.build_request("POST", "/api/v1/communities/new", content=b'{"name":"abc"}')
    assert "Content-Type" not in request.headers
    r = await admin.send(request)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "abc"
    # A Content-Type that says it is not JSON is refused, and the error says why.
    r = await admin.post(
        "/api/v1/communities/new",
        content=b'{"name":"abc"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert "Content-Type" in assert_matrix_error(r, 400, "M_NOT_JSON")


async def test_unknown_community_is_404(admin: httpx.AsyncClient) -> None:
    assert_matrix_error(await admin.get("/api/v1/communities/nope"), 404, "M_NOT_FOUND")
    r = await admin.patch("/api/v1/communities/nope", json={"name": "New name"})
    assert_matrix_error(r, 404, "M_NOT_FOUND")
    r = await admin.post("/api/v1/communities/nope/config", json={})
    assert_matrix_error(r, 404, "M_NOT_FOUND")


async def test_patch_merges_config_keys_and_null_removes_one(
    admin: httpx.AsyncClient, config_changes: ConfigChanges
) -> None:
    cid = await new_community(admin)
    r = await admin.patch(
        f"/api/v1/communities/{cid}",
        json={"config": {"spam_threshold": 0.5, "webhook_url": "https://hooks.example/x"}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["config"] == {"spam_threshold": 0.5, "webhook_url": "https://hooks.example/x"}
    await config_changes.expect({"community_id": cid})

    # Only the given key changes; the others are kept.
    r = await admin.patch(f"/api/v1/communities/{cid}", json={"config": {"spam_threshold": 1}})
    assert r.json()["config"] == {"spam_threshold": 1.0, "webhook_url": "https://hooks.example/x"}
    await config_changes.expect({"community_id": cid})

    # null removes the override: the instance default applies again.
    r = await admin.patch(f"/api/v1/communities/{cid}", json={"config": {"webhook_url": None}})
    assert r.json()["config"] == {"spam_threshold": 1.0}
    await config_changes.expect({"community_id": cid})
    r = await admin.get(f"/api/v1/communities/{cid}")
    assert r.json()["config"] == {"spam_threshold": 1.0}


async def test_patch_changes_name_and_self_join_and_keeps_the_rest(
    admin: httpx.AsyncClient, config_changes: ConfigChanges
) -> None:
    cid = await new_community(admin, "Before")
    await admin.patch(f"/api/v1/communities/{cid}", json={"config": {"spam_threshold": 0.1}})
    r = await admin.patch(
        f"/api/v1/communities/{cid}",
        # A client may send back what it fetched: community_id and unknown fields are
        # ignored, as in policyserv.
        json={"name": "  After ", "can_self_join_rooms": True, "community_id": "other", "x": 1},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "community_id": cid,
        "name": "After",
        "config": {"spam_threshold": 0.1},
        "can_self_join_rooms": True,
    }
    await config_changes.expect({"community_id": cid})
    r = await admin.patch(f"/api/v1/communities/{cid}", json={"can_self_join_rooms": False})
    assert r.json()["can_self_join_rooms"] is False
    assert r.json()["name"] == "After"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": None}, "name"),
        ({"config": None}, "config"),
        ({"can_self_join_rooms": None}, "can_self_join_rooms"),
        ({"can_self_join_rooms": "true"}, "can_self_join_rooms"),
        ({"can_self_join_rooms": 1}, "can_self_join_rooms"),
        ({"name": "ab"}, "name"),
        ({"config": []}, "config"),
        ({"config": {"no_such_key": True}}, "config.no_such_key"),
        ({"config": {"spam_threshold": "high"}}, "config.spam_threshold"),
        ({"config": {"spam_threshold": True}}, "config.spam_threshold"),
        ({"config": {"webhook_url": 5}}, "config.webhook_url"),
    ],
)
async def test_invalid_patches_are_refused_naming_the_field(
    admin: httpx.AsyncClient, admin_pool: asyncpg.Pool, body: dict[str, object], field: str
) -> None:
    r = await admin.patch("/api/v1/communities/default", json=body)
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert message.startswith(f"{field}:"), message
    row = await admin_pool.fetchrow("SELECT name, config FROM communities WHERE id = 'default'")
    assert row is not None
    assert row["name"] == "Default community"
    assert row["config"] == "{}"


async def test_instance_only_keys_cannot_be_set_by_a_community(
    admin: httpx.AsyncClient, instance_only_key: str
) -> None:
    r = await admin.patch("/api/v1/communities/default", json={"config": {instance_only_key: "x"}})
    message = assert_matrix_error(r, 400, "M_BAD_JSON")
    assert message.startswith(f"config.{instance_only_key}:") and "instance" in message
    r = await admin.post("/api/v1/communities/default/config", json={instance_only_key: "x"})
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith(f"{instance_only_key}:")


async def test_post_config_replaces_the_whole_config(
    admin: httpx.AsyncClient, config_changes: ConfigChanges
) -> None:
    cid = await new_community(admin)
    await admin.patch(
        f"/api/v1/communities/{cid}",
        json={"config": {"spam_threshold": 0.2, "webhook_url": "https://h.example/1"}},
    )
    config_changes.drain()
    r = await admin.post(f"/api/v1/communities/{cid}/config", json={"webhook_url": ""})
    assert r.status_code == 200, r.text
    assert r.json()["config"] == {"webhook_url": ""}  # spam_threshold is gone
    await config_changes.expect({"community_id": cid})
    r = await admin.post(f"/api/v1/communities/{cid}/config", json={})
    assert r.json()["config"] == {}
    await config_changes.expect({"community_id": cid})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"spam_threshold": [1]}, "spam_threshold"),
        ({"webhook_url": None}, "webhook_url"),
    ],
)
async def test_post_config_validates_every_key(
    admin: httpx.AsyncClient, body: dict[str, object], field: str
) -> None:
    r = await admin.post("/api/v1/communities/default/config", json=body)
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith(f"{field}:")
    r = await admin.post("/api/v1/communities/default/config", json=[body])
    assert_matrix_error(r, 400, "M_BAD_JSON")


async def test_instance_defaults_are_layered_and_hide_instance_only_keys(
    admin_pool: asyncpg.Pool,
    publisher_nats: NATS,
    monkeypatch: pytest.MonkeyPatch,
    instance_only_key: str,
) -> None:
    # Layer 1 (code defaults) for every key a community may set.
    keys = {k.name: k for k in known_keys().values() if not k.instance_only}
    async with client_for(build_test_app(API_KEY, admin_pool, publisher_nats), AUTH) as c:
        r = await c.get("/api/v1/instance/community_config")
    assert r.status_code == 200
    assert r.json() == {name: key.default for name, key in keys.items()}
    assert instance_only_key not in r.json()

    # Layer 2: PS_* environment values override the code defaults (read at start-up).
    monkeypatch.setenv("PS_SPAM_THRESHOLD", "0.25")
    monkeypatch.setenv("PS_WEBHOOK_URL", "https://instance.example/hook")
    monkeypatch.setenv("PS_" + instance_only_key.upper(), "s3cret")
    async with client_for(build_test_app(API_KEY, admin_pool, publisher_nats), AUTH) as c:
        r = await c.get("/api/v1/instance/community_config")
        defaults = r.json()
        assert defaults["spam_threshold"] == 0.25
        assert defaults["webhook_url"] == "https://instance.example/hook"
        assert instance_only_key not in defaults
        assert "s3cret" not in r.text

        # Layer 3: a community's override is stored on the community; the instance
        # defaults it inherits from do not change.
        r = await c.patch("/api/v1/communities/default", json={"config": {"spam_threshold": 0.9}})
        assert r.json()["config"] == {"spam_threshold": 0.9}
        r = await c.get("/api/v1/instance/community_config")
        assert r.json()["spam_threshold"] == 0.25

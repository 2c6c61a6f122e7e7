"""Config writes: policyserv's legacy score-model keys are accepted with a warning,
the new filters' keys are accepted, and a key that is neither is refused by name."""

from __future__ import annotations

import httpx

from tests.admin_api.admin_api_helpers import assert_matrix_error
from warden.policy.config import LEGACY_KEYS

NEW_FILTER_KEYS = {
    "unsafe_signing_key_filter_enabled": False,
    "inline_emoji_size_filter_max_height_pixels": 64,
    "mention_frequency_filter_rate_limit": 0.5,
    "mention_frequency_filter_min_plaintext_length": 3,
    "sticky_events_filter_allow_sticky_events": False,
    "link_filter_allowed_url_globs": ["https://matrix.org/*"],
    "link_filter_denied_url_globs": ["*bit.ly*"],
    "user_id_contains_words_filter_max_words": 4,
    "user_id_length_filter_max_length": 64,
}


async def _new(admin: httpx.AsyncClient) -> str:
    r = await admin.post("/api/v1/communities/new", json={"name": "Legacy test"})
    assert r.status_code == 200, r.text
    return str(r.json()["community_id"])


async def test_legacy_keys_are_accepted_with_a_warning(admin: httpx.AsyncClient) -> None:
    assert "spam_threshold" in LEGACY_KEYS
    cid = await _new(admin)
    r = await admin.post(
        f"/api/v1/communities/{cid}/config",
        json={"spam_threshold": 0.5, "keyword_filter_keywords": ["x"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # The usual answer, unchanged, plus the warnings.
    assert body["community_id"] == cid and body["name"] == "Legacy test"
    assert body["config"] == {"spam_threshold": 0.5, "keyword_filter_keywords": ["x"]}
    assert body["can_self_join_rooms"] is False
    assert len(body["warnings"]) == 1
    assert body["warnings"][0].startswith("spam_threshold:")
    assert "ignored" in body["warnings"][0]

    r = await admin.patch(f"/api/v1/communities/{cid}", json={"config": {"spam_threshold": 0.9}})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"][0].startswith("spam_threshold:")

    # No legacy key set (or one removed with null): no warnings field at all.
    r = await admin.patch(f"/api/v1/communities/{cid}", json={"config": {"spam_threshold": None}})
    assert r.status_code == 200, r.text
    assert "warnings" not in r.json()
    assert r.json()["config"] == {"keyword_filter_keywords": ["x"]}
    r = await admin.get(f"/api/v1/communities/{cid}")
    assert "warnings" not in r.json()


async def test_new_filter_keys_are_accepted(admin: httpx.AsyncClient) -> None:
    cid = await _new(admin)
    r = await admin.post(f"/api/v1/communities/{cid}/config", json=NEW_FILTER_KEYS)
    assert r.status_code == 200, r.text
    assert r.json()["config"] == NEW_FILTER_KEYS
    assert "warnings" not in r.json()
    # The community's false is stored and read back (policyserv drops it).
    r = await admin.get(f"/api/v1/communities/{cid}")
    assert r.json()["config"]["unsafe_signing_key_filter_enabled"] is False


async def test_unknown_keys_are_still_refused_by_name(admin: httpx.AsyncClient) -> None:
    cid = await _new(admin)
    r = await admin.post(
        f"/api/v1/communities/{cid}/config", json={"spam_threshold": 0.5, "spam_thresold": 0.5}
    )
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith("spam_thresold:")
    r = await admin.patch(f"/api/v1/communities/{cid}", json={"config": {"link_filter_globs": []}})
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith("config.link_filter_globs:")
    # Wrong types of the new keys are refused too.
    r = await admin.post(
        f"/api/v1/communities/{cid}/config", json={"link_filter_denied_url_globs": "*evil*"}
    )
    assert assert_matrix_error(r, 400, "M_BAD_JSON").startswith("link_filter_denied_url_globs:")
    r = await admin.get(f"/api/v1/communities/{cid}")
    assert r.json()["config"] == {}

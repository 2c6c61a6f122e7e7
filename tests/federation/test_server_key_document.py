"""Our ``/_matrix/key/v2/server`` document, and checks on documents from others."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import sign_json, verify_signed_json

from warden.federation.server_key_document import (
    MAX_KEY_VALIDITY_MS,
    InvalidKeyDocument,
    build_server_key_document,
    verify_server_key_document,
)
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import verify_key_base64

NOW = 1_700_000_000_000
FED_KEY = generate_signing_key("a_fed1")
POLICY_KEY = generate_signing_key("policy_server")
OLD_KEY = generate_signing_key("a_old1")
NOTARY_KEY = generate_signing_key("a_nota")
NOTARY = (ServerName("notary.example"), KeyID("ed25519:a_nota"), get_verify_key(NOTARY_KEY))


def our_doc(**kwargs: Any) -> dict[str, Any]:
    return build_server_key_document("warden.example", FED_KEY, now_ms=NOW, **kwargs)


def test_our_document_is_self_signed_and_lists_only_the_federation_key() -> None:
    doc = our_doc()
    verify_signed_json(doc, "warden.example", get_verify_key(FED_KEY))
    assert doc["server_name"] == "warden.example"
    assert doc["verify_keys"] == {"ed25519:a_fed1": {"key": verify_key_base64(FED_KEY)}}
    assert doc["valid_until_ts"] == NOW + 24 * 3600 * 1000
    assert list(doc["signatures"]) == ["warden.example"]
    assert list(doc["signatures"]["warden.example"]) == ["ed25519:a_fed1"]
    assert verify_key_base64(POLICY_KEY) not in str(doc)


def test_the_policy_key_is_never_published() -> None:
    with pytest.raises(ValueError, match="policy key"):
        build_server_key_document("warden.example", POLICY_KEY, now_ms=NOW)


def test_our_document_passes_our_own_verification() -> None:
    doc = our_doc(old_verify_keys={KeyID("ed25519:a_old1"): (get_verify_key(OLD_KEY), NOW - 5)})
    keys = verify_server_key_document(doc, "warden.example", now_ms=NOW)
    assert set(keys) == {"ed25519:a_fed1", "ed25519:a_old1"}
    assert keys[KeyID("ed25519:a_fed1")].valid_until_ts == NOW + 24 * 3600 * 1000
    assert not keys[KeyID("ed25519:a_fed1")].expired
    old = keys[KeyID("ed25519:a_old1")]
    assert (old.expired, old.valid_until_ts) == (True, NOW - 5)
    assert bytes(old.verify_key) == bytes(get_verify_key(OLD_KEY))


def test_validity_is_capped_at_seven_days() -> None:
    doc = our_doc(valid_for_ms=365 * 24 * 3600 * 1000)
    keys = verify_server_key_document(doc, "warden.example", now_ms=NOW)
    assert keys[KeyID("ed25519:a_fed1")].valid_until_ts == NOW + MAX_KEY_VALIDITY_MS


def resign(doc: dict[str, Any], key: Any = FED_KEY, name: str = "warden.example") -> dict[str, Any]:
    unsigned = {k: v for k, v in doc.items() if k != "signatures"}
    return sign_json(unsigned, name, key)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(server_name="evil.example"), "is for 'evil.example'"),
        (lambda d: d.pop("valid_until_ts"), "valid_until_ts"),
        (lambda d: d.update(valid_until_ts="1"), "valid_until_ts"),
        (lambda d: d.update(valid_until_ts=True), "valid_until_ts"),
        (lambda d: d.update(valid_until_ts=NOW + 1), "does not verify"),  # tampered
        (lambda d: d.pop("signatures"), "not signed"),
        (lambda d: d["signatures"].pop("warden.example"), "no signature"),
        (lambda d: d.update(verify_keys=[]), "not an object"),
        (lambda d: d["verify_keys"]["ed25519:a_fed1"].update(key="***"), "ed25519:a_fed1"),
        (
            lambda d: d.update(old_verify_keys={"ed25519:x": {"key": "AAAA"}}),
            "expired_ts",
        ),
    ],
)
def test_bad_documents_are_rejected(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(our_doc())
    mutate(doc)
    with pytest.raises(InvalidKeyDocument, match=message):
        verify_server_key_document(doc, "warden.example", now_ms=NOW)


def test_a_document_signed_only_by_an_unlisted_key_is_rejected() -> None:
    doc = resign(our_doc(), key=OLD_KEY)
    with pytest.raises(InvalidKeyDocument, match="not signed by any"):
        verify_server_key_document(doc, "warden.example", now_ms=NOW)


def test_a_bad_signature_beside_a_good_one_is_rejected() -> None:
    second = generate_signing_key("a_fed2")
    doc = our_doc()
    unsigned = {k: v for k, v in doc.items() if k != "signatures"}
    unsigned["verify_keys"]["ed25519:a_fed2"] = {"key": verify_key_base64(second)}
    signed = sign_json(sign_json(unsigned, "warden.example", FED_KEY), "warden.example", second)
    assert set(verify_server_key_document(signed, "warden.example", now_ms=NOW)) == {
        "ed25519:a_fed1",
        "ed25519:a_fed2",
    }
    signed["signatures"]["warden.example"]["ed25519:a_fed2"] = signed["signatures"][
        "warden.example"
    ]["ed25519:a_fed1"]
    with pytest.raises(InvalidKeyDocument, match="a_fed2 does not verify"):
        verify_server_key_document(signed, "warden.example", now_ms=NOW)


def test_unknown_algorithms_are_ignored_not_fatal() -> None:
    doc = our_doc()
    unsigned = {k: v for k, v in doc.items() if k != "signatures"}
    unsigned["verify_keys"]["curve9:x"] = {"key": "whatever"}
    keys = verify_server_key_document(resign(unsigned), "warden.example", now_ms=NOW)
    assert set(keys) == {"ed25519:a_fed1"}


def test_notary_signature_is_required_when_asked() -> None:
    doc = our_doc()
    notarised = sign_json(copy.deepcopy(doc), "notary.example", NOTARY_KEY)
    keys = verify_server_key_document(notarised, "warden.example", now_ms=NOW, notary=NOTARY)
    assert set(keys) == {"ed25519:a_fed1"}
    # Not signed by the notary at all.
    with pytest.raises(InvalidKeyDocument, match="pinned key"):
        verify_server_key_document(doc, "warden.example", now_ms=NOW, notary=NOTARY)
    # Signed by a notary key other than the pinned one.
    impostor = generate_signing_key("a_nota")
    forged = sign_json(copy.deepcopy(doc), "notary.example", impostor)
    with pytest.raises(InvalidKeyDocument, match="notary's signature"):
        verify_server_key_document(forged, "warden.example", now_ms=NOW, notary=NOTARY)
    # Edited after the notary signed (both signatures now fail; the origin's first).
    notarised["valid_until_ts"] += 1
    with pytest.raises(InvalidKeyDocument, match="does not verify"):
        verify_server_key_document(notarised, "warden.example", now_ms=NOW, notary=NOTARY)

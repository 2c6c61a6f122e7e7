"""X-Matrix: our headers against Synapse's parser and authenticator, and the reverse.

Synapse's own code is the oracle: ``MatrixFederationHttpClient.build_auth_headers`` and
``Authenticator.authenticate_request`` are called unbound with a minimal ``self``, so
the header format and the signed JSON are Synapse's, not a copy of them.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from signedjson.key import generate_signing_key, get_verify_key
from signedjson.sign import verify_signed_json
from synapse.api.errors import SynapseError
from synapse.federation.transport.server._base import (
    AuthenticationError,
    Authenticator,
    _parse_auth_header,
)
from synapse.http.matrixfederationclient import MatrixFederationHttpClient

from tests.matrix.event_strategies import json_objects
from tests.matrix.event_strategies import text as json_text
from warden.federation.keyring_errors import KeyExpired, KeyNotFound
from warden.federation.xmatrix import (
    _PARAM_RE,
    MalformedAuthorization,
    XMatrixCredentials,
    _signing_payload,
    _signing_payload_from_json,
    _simple_params,
    _usual_params,
    authenticate_headers,
    is_valid_server_name,
    parse_authorization_headers,
    sign_request,
    verify_request,
    verify_request_json,
)
from warden.matrix.canonical_json import encode_canonical_json
from warden.matrix.errors import Unauthorized
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import VerifyKey, key_id_of

ORIGIN = "origin.example"
US = "warden.example"
URI = "/_matrix/policy/v1/sign?x=1"
BODY: dict[str, Any] = {"room_id": "!r:origin.example", "content": {"body": "héllo"}, "n": 5}

ORIGIN_KEY = generate_signing_key("a_orig")
OTHER_KEY = generate_signing_key("a_othr")


class FakeKeyring:
    """Serves fixed keys, and records what was asked for."""

    def __init__(self, keys: dict[tuple[str, str], Any], expired: frozenset[str] = frozenset()):
        self.keys = keys
        self.expired = expired
        self.calls: list[tuple[str, str]] = []

    async def get_verify_key(
        self, server_name: ServerName, key_id: KeyID, *, at_ms: int | None = None
    ) -> VerifyKey:
        self.calls.append((server_name, key_id))
        if key_id in self.expired:
            raise KeyExpired(f"{key_id} expired")
        try:
            key: VerifyKey = self.keys[(server_name, key_id)]
        except KeyError:
            raise KeyNotFound(f"no {key_id}") from None
        return key


def origin_keyring() -> FakeKeyring:
    return FakeKeyring({(ORIGIN, key_id_of(ORIGIN_KEY)): ORIGIN_KEY.verify_key})


def synapse_headers(
    method: str, uri: str, content: dict[str, Any] | None, destination: str = US
) -> list[str]:
    """Headers exactly as Synapse's federation client builds them."""
    fake_self = SimpleNamespace(server_name=ORIGIN, signing_key=ORIGIN_KEY)
    raw = MatrixFederationHttpClient.build_auth_headers(
        fake_self,  # type: ignore[arg-type]
        destination.encode(),
        method.encode(),
        uri.encode(),
        content,
    )
    return [h.decode("ascii") for h in raw]


async def synapse_authenticate(
    method: str, uri: str, content: dict[str, Any] | None, headers: list[str]
) -> str:
    """Run Synapse's ``Authenticator.authenticate_request`` on a request."""
    keys = {key_id_of(ORIGIN_KEY): get_verify_key(ORIGIN_KEY)}

    class SynapseLikeKeyring:
        async def verify_json_for_server(
            self, server_name: str, json_object: dict[str, Any], validity_time: int
        ) -> None:
            # Synapse's rule: every signature by a known key verifies, at least one.
            verified = False
            for key_id in json_object["signatures"].get(server_name, {}):
                if key_id in keys:
                    verify_signed_json(json_object, server_name, keys[key_id])
                    verified = True
            if not verified:
                raise SynapseError(401, "no key")

    class Store:
        async def get_destination_retry_timings(self, origin: str) -> None:
            return None

    fake_self = SimpleNamespace(
        _clock=SimpleNamespace(time_msec=lambda: 0),
        keyring=SynapseLikeKeyring(),
        server_name=US,
        _is_mine_server_name=lambda name: name == US,
        store=Store(),
        federation_domain_whitelist=None,
    )
    request = SimpleNamespace(
        method=method.encode(),
        uri=uri.encode(),
        requestHeaders=SimpleNamespace(getRawHeaders=lambda name: [h.encode() for h in headers]),
        requester=None,
    )
    origin: str = await Authenticator.authenticate_request(fake_self, request, content)  # type: ignore[arg-type]
    return origin


# --- our headers, Synapse's checks ---


def test_synapse_parses_our_header() -> None:
    header = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    origin, key, sig, destination = _parse_auth_header(header.encode())
    assert (origin, key, destination) == (ORIGIN, "ed25519:a_orig", US)
    assert sig == header.split('sig="')[1].rstrip('"')


@pytest.mark.parametrize("content", [BODY, None, {}])
async def test_synapse_authenticates_our_header(content: dict[str, Any] | None) -> None:
    header = sign_request(ORIGIN, US, "PUT", URI, content, ORIGIN_KEY)
    assert await synapse_authenticate("PUT", URI, content, [header]) == ORIGIN


async def test_synapse_rejects_our_header_for_another_destination() -> None:
    header = sign_request(ORIGIN, "elsewhere.example", "PUT", URI, BODY, ORIGIN_KEY)
    with pytest.raises(AuthenticationError):
        await synapse_authenticate("PUT", URI, BODY, [header])


async def test_synapse_rejects_our_header_with_edited_body() -> None:
    header = sign_request(ORIGIN, US, "PUT", URI, BODY, ORIGIN_KEY)
    with pytest.raises(Exception, match=r"[Ss]ignature"):
        await synapse_authenticate("PUT", URI, {**BODY, "n": 6}, [header])


# --- Synapse's headers, our checks ---


@pytest.mark.parametrize("content", [BODY, None])
async def test_we_verify_synapse_headers(content: dict[str, Any] | None) -> None:
    headers = synapse_headers("POST", URI, content)
    keyring = origin_keyring()
    assert await verify_request("POST", URI, content, headers, US, keyring) == ORIGIN
    assert keyring.calls == [(ORIGIN, "ed25519:a_orig")]


async def test_round_trip_ours_to_ours() -> None:
    header = sign_request(ORIGIN, US, "GET", "/_matrix/key/v2/server", None, ORIGIN_KEY)
    origin = await verify_request(
        "GET", "/_matrix/key/v2/server", None, [header], US, origin_keyring()
    )
    assert origin == ORIGIN


@pytest.mark.parametrize(
    ("method", "uri", "content", "destination"),
    [
        ("POST", URI, BODY, "elsewhere.example"),  # signed for someone else
        ("POST", URI, {**BODY, "n": 6}, US),  # edited body
        ("POST", URI, None, US),  # body dropped
        ("POST", URI + "&y=2", BODY, US),  # edited uri
        ("PUT", URI, BODY, US),  # edited method
    ],
)
async def test_tampered_requests_fail(
    method: str, uri: str, content: dict[str, Any] | None, destination: str
) -> None:
    # Signed for (POST, URI, BODY, US); verified as the parametrised request.
    headers = synapse_headers("POST", URI, BODY, destination=destination)
    with pytest.raises(Unauthorized) as info:
        await verify_request(method, uri, content, headers, US, origin_keyring())
    assert info.value.errcode == "M_UNAUTHORIZED"
    if destination != US:
        assert "destination" in info.value.error
    else:
        assert "Invalid X-Matrix signature" in info.value.error


async def test_wrong_key_fails() -> None:
    # Signed with another key but claiming the origin's key ID.
    header = sign_request(ORIGIN, US, "POST", URI, BODY, OTHER_KEY).replace(
        "ed25519:a_othr", "ed25519:a_orig"
    )
    with pytest.raises(Unauthorized, match="Invalid X-Matrix signature"):
        await verify_request("POST", URI, BODY, [header], US, origin_keyring())


async def test_unknown_key_fails_with_keyring_reason() -> None:
    header = sign_request(ORIGIN, US, "POST", URI, BODY, OTHER_KEY)
    with pytest.raises(Unauthorized, match=r"No usable key.*no ed25519:a_othr"):
        await verify_request("POST", URI, BODY, [header], US, origin_keyring())


async def test_expired_key_fails() -> None:
    keyring = FakeKeyring(
        {(ORIGIN, "ed25519:a_orig"): ORIGIN_KEY.verify_key}, expired=frozenset({"ed25519:a_orig"})
    )
    header = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    with pytest.raises(Unauthorized, match="expired"):
        await verify_request("POST", URI, BODY, [header], US, keyring)


async def test_destination_absent_is_accepted_but_signed_for_us() -> None:
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    no_dest = good.replace(f',destination="{US}"', "")
    assert "destination" not in no_dest
    assert await verify_request("POST", URI, BODY, [no_dest], US, origin_keyring()) == ORIGIN
    # Without a destination parameter, a signature made for another server still fails.
    other = sign_request(ORIGIN, "elsewhere.example", "POST", URI, BODY, ORIGIN_KEY)
    other_no_dest = other.replace(',destination="elsewhere.example"', "")
    with pytest.raises(Unauthorized, match="Invalid X-Matrix signature"):
        await verify_request("POST", URI, BODY, [other_no_dest], US, origin_keyring())


async def test_no_header_and_other_schemes() -> None:
    with pytest.raises(Unauthorized, match="Missing X-Matrix"):
        await verify_request("POST", URI, BODY, [], US, origin_keyring())
    with pytest.raises(Unauthorized, match="Missing X-Matrix"):
        await verify_request(
            "POST",
            URI,
            BODY,
            # Another scheme, one merely starting with X-Matrix, no space after the scheme.
            ["Bearer abc", "X-Matrixy origin=a,key=b,sig=c", "X-Matrixorigin=a,key=b,sig=c"],
            US,
            origin_keyring(),
        )


async def test_missing_sig_and_garbage_quoting_fail() -> None:
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    sig_part = "," + good.split(",")[-1]
    bad_headers = [
        good.replace(sig_part, ""),  # no sig
        good.replace('origin="origin.example"', 'origin="origin.example'),  # unclosed quote
        good.replace('key="ed25519:a_orig"', 'key=ed25519:a_orig"'),  # stray quote
        good.replace(",key=", ",,key="),  # empty element
        good + ",",  # trailing comma
        good + ',key="ed25519:a_orig"',  # duplicated parameter
        good.replace('origin="origin.example"', 'origin="bad/name"'),  # invalid server name
        "X-Matrix",  # no parameters
        "X-Matrix   ",  # only spaces
    ]
    for header in bad_headers:
        with pytest.raises(Unauthorized, match="Malformed"):
            await verify_request("POST", URI, BODY, [header], US, origin_keyring())


async def test_bad_base64_signature_fails() -> None:
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    bad = good.rsplit('sig="', 1)[0] + 'sig="!!!not-base64!!!"'
    with pytest.raises(Unauthorized, match="not base64"):
        await verify_request("POST", URI, BODY, [bad], US, origin_keyring())


async def test_several_headers() -> None:
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    unknown = sign_request(ORIGIN, US, "POST", URI, BODY, OTHER_KEY)
    # A header with a key we cannot get is skipped when another verifies.
    assert await verify_request("POST", URI, BODY, [unknown, good], US, origin_keyring())
    # A checkable but wrong signature fails the request even beside a good one.
    keyring = FakeKeyring(
        {
            (ORIGIN, "ed25519:a_orig"): ORIGIN_KEY.verify_key,
            (ORIGIN, "ed25519:a_othr"): OTHER_KEY.verify_key,
        }
    )
    forged = sign_request(ORIGIN, US, "POST", URI, {"x": 1}, OTHER_KEY)
    with pytest.raises(Unauthorized, match="Invalid X-Matrix signature"):
        await verify_request("POST", URI, BODY, [good, forged], US, keyring)
    # Headers naming different origins are refused.
    mixed = sign_request("other.example", US, "POST", URI, BODY, OTHER_KEY)
    with pytest.raises(Unauthorized, match="different origins"):
        await verify_request("POST", URI, BODY, [good, mixed], US, keyring)


async def test_too_many_headers_are_refused_before_any_key_lookup() -> None:
    # Review H8: 5000 headers, each with its own key ID, cost no lookup at all.
    keyring = origin_keyring()
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    many = [good.replace('key="ed25519:a_orig"', f'key="ed25519:k{i}"') for i in range(5000)]
    with pytest.raises(Unauthorized, match="more than 4 X-Matrix headers"):
        await verify_request("POST", URI, BODY, [*many, good], US, keyring)
    assert keyring.calls == []
    # Four are fine (the one that verifies among them).
    assert await verify_request("POST", URI, BODY, [*many[:3], good], US, keyring)


async def test_a_key_id_given_twice_is_refused_before_any_key_lookup() -> None:
    # A valid header repeated would cost one signature check per copy.
    keyring = origin_keyring()
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    with pytest.raises(Unauthorized, match="given twice"):
        await verify_request("POST", URI, BODY, [good, good], US, keyring)
    assert keyring.calls == []


async def test_headers_are_checked_and_keys_obtained_before_the_body() -> None:
    # Review H7: authenticate_headers needs no body; only the signature check does.
    keyring = origin_keyring()
    good = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    auth = await authenticate_headers([good], US, keyring)
    assert keyring.calls == [(ORIGIN, "ed25519:a_orig")]
    assert auth.verify_content("POST", URI, BODY) == ORIGIN
    with pytest.raises(Unauthorized, match="Invalid X-Matrix signature"):
        auth.verify_content("POST", URI, {"other": "body"})
    unknown = sign_request(ORIGIN, US, "POST", URI, BODY, OTHER_KEY)
    with pytest.raises(Unauthorized, match="No usable key"):
        await authenticate_headers([unknown], US, keyring)
    with pytest.raises(Unauthorized, match="Missing X-Matrix"):
        await authenticate_headers([], US, keyring)


async def test_non_canonical_body_is_refused() -> None:
    header = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    with pytest.raises(Unauthorized, match="canonical"):
        await verify_request("POST", URI, {"f": 1.5}, [header], US, origin_keyring())


# --- the parser on its own ---


def test_parser_accepts_rfc9110_forms() -> None:
    values = [
        'x-matrix ORIGIN=origin.example , Key = "ed25519:a_orig",\tSIG="abc",extra=1',
        'X-Matrix origin="a\\"b.example",key=ed25519:k,sig=s,destination=[::1]:8448',
    ]
    # The second origin is not a valid server name once unescaped.
    with pytest.raises(MalformedAuthorization):
        parse_authorization_headers(values)
    creds = parse_authorization_headers(values[:1])
    assert creds == [
        XMatrixCredentials(ServerName("origin.example"), KeyID("ed25519:a_orig"), "abc", None)
    ]
    (cred,) = parse_authorization_headers(
        ['X-Matrix origin="[::1]:8448",key="ed25519:k",sig="s\\\\x",destination="d.example"']
    )
    assert (cred.origin, cred.signature, cred.destination) == ("[::1]:8448", "s\\x", "d.example")


def test_quoting_round_trips_through_synapse_unquoting() -> None:
    # Values needing escapes survive our quoting and Synapse's unquoting alike.
    header = sign_request(ORIGIN, 'we"ird\\dest', "GET", "/p", None, ORIGIN_KEY)
    assert _parse_auth_header(header.encode())[3] == 'we"ird\\dest'
    assert parse_authorization_headers([header])[0].destination == 'we"ird\\dest'


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("example.org", True),
        ("example.org:8448", True),
        ("1.2.3.4:80", True),
        ("[::1]:8448", True),
        ("[2001:db8::1]", True),
        ("", False),
        ("exa mple.org", False),
        ("example.org:", False),
        ("example.org:99999", False),
        ("example.org:0", False),
        ("ex_ample.org", False),
        ("a" * 256, False),
    ],
)
def test_server_name_grammar(name: str, valid: bool) -> None:
    assert is_valid_server_name(name) is valid


async def test_verify_is_fast_enough() -> None:
    # The hot path: one canonical encode, one signature check per request.
    header = sign_request(ORIGIN, US, "POST", URI, BODY, ORIGIN_KEY)
    keyring = origin_keyring()
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(500):
        await verify_request("POST", URI, BODY, [header], US, keyring)
    assert loop.time() - start < 2.0


# --- the signed bytes assembled around a body already in canonical JSON ---


@given(
    method=json_text,
    uri=json_text,
    origin=json_text,
    destination=json_text,
    content=st.one_of(st.none(), json_objects),
)
def test_payload_from_body_bytes_is_the_canonical_encoding(
    method: str, uri: str, origin: str, destination: str, content: dict[str, Any] | None
) -> None:
    content_json = None if content is None else encode_canonical_json(content)
    assert _signing_payload_from_json(
        method, uri, origin, destination, content_json
    ) == _signing_payload(method, uri, origin, destination, content)


async def test_verify_request_json_accepts_synapse_headers_and_refuses_other_bytes() -> None:
    content = {"room_id": "!r:example.org", "body": "caf\u00e9 \U0001f600", "n": 1}
    keyring = origin_keyring()
    headers = synapse_headers("POST", URI, content)
    origin = await verify_request_json(
        "POST", URI, encode_canonical_json(content), headers, US, keyring
    )
    assert origin == ORIGIN
    with pytest.raises(Unauthorized):
        await verify_request_json(
            "POST", URI, encode_canonical_json({**content, "n": 2}), headers, US, keyring
        )


def _sequential_params(rest: str) -> dict[str, str] | None:
    """The parameter list parsed one match at a time (the oracle); None if malformed."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None:
            return None
        name, raw = match.group(1).lower(), match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.DOTALL)
        if name in params:
            return None
        params[name] = raw
        pos = match.end()
        if pos == len(rest):
            break
        sep = re.compile(r"[ \t]*,[ \t]*").match(rest, pos)
        if sep is None or sep.end() == len(rest):
            return None
        pos = sep.end()
    return params


@given(st.text(alphabet=' \t,="\\oOrigink=sdeyt:1.a-', max_size=60))
def test_header_parser_agrees_with_a_parameter_at_a_time_parse(tail: str) -> None:
    value = "X-Matrix " + tail
    expected = _sequential_params(value[len("X-Matrix ") :].strip(" \t"))
    try:
        [creds] = parse_authorization_headers([value])
    except MalformedAuthorization:
        ok = (
            expected is not None
            and all(expected.get(k) for k in ("origin", "key", "sig"))
            and is_valid_server_name(expected["origin"])
        )
        assert not ok
        return
    assert expected is not None
    assert (creds.origin, creds.key_id, creds.signature) == (
        expected["origin"],
        expected["key"],
        expected["sig"],
    )
    assert creds.destination == expected.get("destination")


_HOMESERVER_PARAMS = st.lists(
    st.tuples(
        st.sampled_from(["origin", "Origin", "destination", "key", "KEY", "sig", "x"]),
        st.text(alphabet=' \t,="\\oOrigin:1.a-_A+/', max_size=12),
    ),
    min_size=1,
    max_size=6,
)


@given(_HOMESERVER_PARAMS)
def test_the_homeserver_form_is_read_as_the_general_parser_reads_it(
    pairs: list[tuple[str, str]],
) -> None:
    """``_simple_params`` (the fast path) answers only for lists the general parser reads
    the same way, and answers for every list in the form homeservers send."""
    rest = ",".join(f'{name}="{value}"' for name, value in pairs)
    simple = _simple_params(rest)
    if simple is not None:
        assert simple == _sequential_params(rest)
    clean = all(not set(value) & set(',"\\') for _, value in pairs)
    distinct = len({name.lower() for name, _ in pairs}) == len(pairs)
    assert (simple is not None) == (clean and distinct)


_VALUES = st.text(alphabet=' \t,="\\oOrigin:1.a-_A+/', max_size=12)
_USUAL_ORDER = ["origin", "destination", "key", "sig"]
_PARAM_LISTS = st.one_of(
    st.tuples(*[st.tuples(st.just(name), _VALUES) for name in _USUAL_ORDER]).map(list),
    st.lists(
        st.tuples(st.sampled_from([*_USUAL_ORDER, "Origin", "x"]), _VALUES),
        min_size=1,
        max_size=6,
    ),
)


@given(_PARAM_LISTS)
def test_the_usual_form_is_read_as_the_general_parser_reads_it(
    pairs: list[tuple[str, str]],
) -> None:
    """``_usual_params`` (one match for Synapse's exact form) answers only for lists the
    general parser reads the same way, and for every list in that exact form."""
    rest = ",".join(f'{name}="{value}"' for name, value in pairs)
    usual = _usual_params(rest)
    if usual is not None:
        assert usual == _sequential_params(rest) == _simple_params(rest)
    clean = all(not set(value) & set(',"\\') for _, value in pairs)
    in_order = [name for name, _ in pairs] == _USUAL_ORDER
    assert (usual is not None) == (clean and in_order)

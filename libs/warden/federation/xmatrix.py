"""X-Matrix request authentication (spec: Server-Server API, "Request Authentication").

A federation request is authenticated by signing the canonical JSON of
``{method, uri, origin, destination, content?}`` with the origin's federation key and
sending each signature in its own ``Authorization: X-Matrix ...`` header.

Decisions on points the spec leaves open, and how they compare to Synapse:

* Parsing follows RFC 9110 ``auth-param`` syntax: the scheme and parameter names are
  case-insensitive, values are tokens or quoted strings (with ``\\`` escapes), and
  parameters are separated by commas with optional whitespace. Malformed headers,
  duplicated parameters and a missing ``origin``, ``key`` or ``sig`` are rejected;
  unknown parameters are ignored so that future additions do not break us. Synapse's
  parser is looser (a duplicated parameter silently takes the last value).
* ``destination`` may be absent: the spec says recipients should accept that from older
  servers. When present it must be our server name. Either way the signed JSON uses
  our name, so a request signed for someone else never verifies.
* Several X-Matrix headers may be sent (one per key of the origin). They must all name
  the same origin. Every signature whose key we can obtain must verify; keys we cannot
  obtain (unknown, expired) are skipped, and at least one signature must verify. This
  matches Synapse's keyring, except that Synapse lets the last header's origin win
  when headers disagree, which we refuse.
* At most ``MAX_XMATRIX_HEADERS`` X-Matrix headers, each with a key ID of its own
  (review H8): each header costs a key lookup, maybe a fetch, and a signature check, all
  before the request is authenticated. More, or a key ID twice, is 401 at once, before
  any header is parsed past counting or any key looked up.
* The headers are checked, and the origin's keys obtained, before the body is read
  (``authenticate_headers``, review H7): a request without a usable X-Matrix header, or
  from an origin whose key cannot be had, costs no body read or JSON parse. The
  signature over the body is checked afterwards (``HeaderAuthentication.verify``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import nacl.exceptions
import orjson
from unpaddedbase64 import decode_base64, encode_base64

from warden.federation.keyring_errors import KeyringError
from warden.matrix.canonical_json import CanonicalJSONError, encode_canonical_json
from warden.matrix.errors import Unauthorized
from warden.matrix.ids import KeyID, ServerName
from warden.matrix.keys import SigningKey, VerifyKey, key_id_of

SCHEME = "X-Matrix"

# RFC 9110 token characters.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # noqa: S105 - a regex, not a secret
# Unrolled ("normal* (special normal*)*"): one alternation per character would make the
# header's ~90-character signature cost a backtracking step each.
_QUOTED = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_OWS = r"[ \t]*"
_PARAM_RE = re.compile(rf"({_TOKEN}){_OWS}={_OWS}({_TOKEN}|{_QUOTED})")
_SEP_RE = re.compile(rf"{_OWS},{_OWS}")
# A whole parameter list: checked with one match, then split with ``findall``.
_PARAM = rf"{_TOKEN}{_OWS}={_OWS}(?:{_TOKEN}|{_QUOTED})"
_PARAMS_RE = re.compile(rf"{_PARAM}(?:{_OWS},{_OWS}{_PARAM})*")
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
# One parameter of the form homeservers send: name="value", nothing to unescape.
_SIMPLE_PARAM_RE = re.compile(r'([A-Za-z]+)="([^",\\]*)"')
_ESCAPE_RE = re.compile(r'(["\\])')
# The whole list exactly as Synapse and most homeservers send it: one match, no split.
_USUAL_NAMES = ("origin", "destination", "key", "sig")
_USUAL_RE = re.compile(",".join(rf'{name}="([^",\\]*)"' for name in _USUAL_NAMES))

# Server name grammar (spec: Appendices, "Server Name").
_IPV4 = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
_IPV6 = r"\[[0-9A-Fa-f:.]{2,45}\]"
_DNS = r"[0-9A-Za-z.\-]{1,255}"
_SERVER_NAME_RE = re.compile(rf"(?:{_IPV4}|{_IPV6}|{_DNS})(?::(?P<port>\d{{1,5}}))?")

_KNOWN_PARAMS = frozenset({"origin", "destination", "key", "sig"})

# Servers sign with one key, two while rotating: four leaves room and bounds the work.
MAX_XMATRIX_HEADERS = 4


class VerifyKeySource(Protocol):
    """What ``verify_request`` needs from a keyring."""

    async def get_verify_key(
        self,
        server_name: ServerName,
        key_id: KeyID,
        *,
        at_ms: int | None = None,
        requester: str | None = None,
    ) -> VerifyKey:
        """Return the key, or raise an exception whose message says why not.

        ``requester``, when given, is the client address a fetch is charged to.
        """
        ...


@dataclass(frozen=True, slots=True)
class XMatrixCredentials:
    """One parsed ``Authorization: X-Matrix`` header."""

    origin: ServerName
    key_id: KeyID
    signature: str
    destination: ServerName | None


class MalformedAuthorization(ValueError):
    """An X-Matrix header that cannot be parsed."""


def is_valid_server_name(name: str) -> bool:
    """Whether ``name`` matches the spec's server name grammar (host and optional port)."""
    match = _SERVER_NAME_RE.fullmatch(name)
    if match is None:
        return False
    port = match.group("port")
    return port is None or 0 < int(port) <= 65535


def _quote(value: str) -> str:
    return '"' + _ESCAPE_RE.sub(r"\\\1", value) + '"'


def _signing_payload(
    method: str,
    uri: str,
    origin: str,
    destination: str,
    content: Mapping[str, Any] | None,
) -> bytes:
    request: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    return encode_canonical_json(request)


def _json_string(value: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # lone surrogates
        raise CanonicalJSONError(str(exc)) from exc


def _signing_payload_from_json(
    method: str, uri: str, origin: str, destination: str, content_json: bytes | None
) -> bytes:
    """``_signing_payload`` with the body already in canonical JSON.

    The keys of the signed object sort as content, destination, method, origin, uri, so
    the canonical encoding can be assembled around the body's bytes: a body seen before
    (a spam wave asks for one event many times) need not be parsed or encoded again.
    """
    tail = b"".join(
        (
            b'"destination":',
            _json_string(destination),
            b',"method":',
            _json_string(method),
            b',"origin":',
            _json_string(origin),
            b',"uri":',
            _json_string(uri),
            b"}",
        )
    )
    if content_json is None:
        return b"{" + tail
    return b'{"content":' + content_json + b"," + tail


def sign_request(
    origin: str,
    destination: str,
    method: str,
    uri: str,
    content: Mapping[str, Any] | None,
    signing_key: SigningKey,
) -> str:
    """Build the ``Authorization`` header value for one federation request.

    ``uri`` is the path and query string exactly as sent; ``content`` is the JSON body
    (``None`` when the request has none). Raises ``CanonicalJSONError`` when the body
    cannot be canonical JSON.
    """
    payload = _signing_payload(method, uri, origin, destination, content)
    sig = encode_base64(signing_key.sign(payload).signature)
    return (
        f"{SCHEME} origin={_quote(origin)},destination={_quote(destination)},"
        f"key={_quote(key_id_of(signing_key))},sig={_quote(sig)}"
    )


def _parse_one(value: str) -> XMatrixCredentials:
    """Parse one header value whose scheme is X-Matrix."""
    rest = value[len(SCHEME) :]
    if not rest or rest[0] not in " \t":
        raise MalformedAuthorization("no parameters after the X-Matrix scheme")
    rest = rest.lstrip(" \t")
    params = _usual_params(rest)
    if params is None:
        params = _simple_params(rest)
    if params is None:
        params = _general_params(rest)
    for required in ("origin", "key", "sig"):
        if not params.get(required):
            raise MalformedAuthorization(f"missing parameter {required!r}")
    origin = params["origin"]
    if not is_valid_server_name(origin):
        raise MalformedAuthorization(f"origin {origin!r} is not a valid server name")
    destination = params.get("destination")
    return XMatrixCredentials(
        origin=ServerName(origin),
        key_id=KeyID(params["key"]),
        signature=params["sig"],
        destination=ServerName(destination) if destination is not None else None,
    )


def _usual_params(rest: str) -> dict[str, str] | None:
    """The parameters when the list is ``origin="…",destination="…",key="…",sig="…"``
    in that order (what Synapse sends), else None: one match for the whole list. Such a
    list is also of the form ``_simple_params`` reads, which would read the same pairs.
    """
    match = _USUAL_RE.fullmatch(rest)
    return None if match is None else dict(zip(_USUAL_NAMES, match.groups(), strict=True))


def _simple_params(rest: str) -> dict[str, str] | None:
    """The parameters of the form every homeserver sends, else None.

    That form is ``name="value"`` pairs joined by bare commas, with no comma, quote or
    backslash in a value; such a list is also well formed for ``_general_params``,
    which would read the same pairs from it (a property test holds them equal). This
    reads it with a split and one short match per pair instead of matching the whole
    list and then scanning it again (about a tenth of a ``/sign`` repeat's Python work).
    Anything else, including a parameter given twice, goes to ``_general_params``.
    """
    params: dict[str, str] = {}
    for part in rest.split(","):
        match = _SIMPLE_PARAM_RE.fullmatch(part)
        if match is None:
            return None
        name = match.group(1).lower()
        if name in params:
            return None
        params[name] = match.group(2)
    return params


def _general_params(rest: str) -> dict[str, str]:
    """The parameters of any well-formed list (RFC 9110 auth-params); raises
    ``MalformedAuthorization`` saying what is wrong otherwise."""
    if _PARAMS_RE.fullmatch(rest) is None:
        _explain_malformed(rest)
    # The whole list is well formed, so the parameters are exactly the non-overlapping
    # matches from the start: a separator (",", spaces) cannot begin a parameter.
    params: dict[str, str] = {}
    for name, raw in _PARAM_RE.findall(rest):
        name = name.lower()
        if raw.startswith('"'):
            raw = raw[1:-1]
            if "\\" in raw:
                raw = _UNESCAPE_RE.sub(r"\1", raw)
        if name in params:
            raise MalformedAuthorization(f"parameter {name!r} given twice")
        params[name] = raw
    return params


def _explain_malformed(rest: str) -> NoReturn:
    """Raise ``MalformedAuthorization`` saying where a parameter list goes wrong."""
    pos = 0
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None:
            raise MalformedAuthorization(f"cannot parse parameter at offset {pos}")
        pos = match.end()
        if pos == len(rest):
            break
        sep = _SEP_RE.match(rest, pos)
        if sep is None:
            raise MalformedAuthorization(f"expected ',' at offset {pos}")
        pos = sep.end()
        if pos == len(rest):
            raise MalformedAuthorization("trailing ','")
    raise MalformedAuthorization("malformed parameters")


def parse_authorization_headers(values: list[str]) -> list[XMatrixCredentials]:
    """Parse every X-Matrix header among ``values`` (all ``Authorization`` headers).

    Headers of other schemes are ignored. Raises ``MalformedAuthorization`` if any
    X-Matrix header is malformed (a bad header is an error, not something to skip), or
    if there are more than ``MAX_XMATRIX_HEADERS`` (counted before any is parsed).
    """
    ours: list[str] = []
    for value in values:
        stripped = value.strip(" \t")
        if stripped[: len(SCHEME)].lower() != SCHEME.lower():
            continue
        # "X-Matrixfoo" is another scheme, not ours.
        if len(stripped) > len(SCHEME) and stripped[len(SCHEME)] not in " \t":
            continue
        ours.append(stripped)
        if len(ours) > MAX_XMATRIX_HEADERS:
            raise MalformedAuthorization(f"more than {MAX_XMATRIX_HEADERS} X-Matrix headers")
    return [_parse_one(value) for value in ours]


@dataclass(frozen=True, slots=True)
class HeaderAuthentication:
    """X-Matrix headers checked, with the origin's keys they name: all but the body.

    ``keys`` pairs each signature whose key could be obtained with that key.
    """

    origin: ServerName
    our_server_name: str
    keys: tuple[tuple[KeyID, bytes, VerifyKey], ...]

    def verify(self, method: str, uri: str, content_json: bytes | None) -> ServerName:
        """Check the signatures over the request; return the origin.

        ``content_json`` is the canonical encoding of the body (``None`` without one).
        Every signature whose key was obtained must verify. Raises ``Unauthorized``.
        """
        try:
            payload = _signing_payload_from_json(
                method, uri, self.origin, self.our_server_name, content_json
            )
        except CanonicalJSONError as exc:
            raise Unauthorized(f"Request is not canonical JSON: {exc}") from None
        for key_id, signature, verify_key in self.keys:
            try:
                verify_key.verify(payload, signature)
            except (nacl.exceptions.BadSignatureError, ValueError):
                raise Unauthorized(
                    f"Invalid X-Matrix signature from {self.origin} with key {key_id}"
                ) from None
        return self.origin

    def verify_content(self, method: str, uri: str, content: Mapping[str, Any]) -> ServerName:
        """``verify`` for a parsed body (``parse_canonical``); encodes it canonically."""
        try:
            content_json = encode_canonical_json(content)
        except CanonicalJSONError as exc:
            raise Unauthorized(f"Request body is not canonical JSON: {exc}") from None
        return self.verify(method, uri, content_json)


async def authenticate_headers(
    headers: list[str],
    our_server_name: str,
    keyring: VerifyKeySource,
    *,
    requester: str | None = None,
) -> HeaderAuthentication:
    """Check the X-Matrix headers and obtain the keys they name, before the body is read.

    ``headers`` are all ``Authorization`` header values; ``requester`` the client
    address key fetches are charged to. Raises ``Unauthorized`` (M_UNAUTHORIZED) for a
    missing, malformed or inconsistent header, too many headers, a key ID given twice,
    or when no named key can be obtained.
    """
    try:
        creds = parse_authorization_headers(headers)
    except MalformedAuthorization as exc:
        raise Unauthorized(f"Malformed X-Matrix Authorization header: {exc}") from None
    if not creds:
        raise Unauthorized("Missing X-Matrix Authorization header")
    origin = creds[0].origin
    key_ids: set[str] = set()
    for cred in creds:
        if cred.origin != origin:
            raise Unauthorized("X-Matrix Authorization headers name different origins")
        if cred.destination is not None and cred.destination != our_server_name:
            raise Unauthorized(f"X-Matrix destination {cred.destination!r} is not this server")
        if cred.key_id in key_ids:
            raise Unauthorized(f"X-Matrix key {cred.key_id!r} given twice")
        key_ids.add(cred.key_id)

    keys: list[tuple[KeyID, bytes, VerifyKey]] = []
    reasons: list[str] = []
    for cred in creds:
        if not cred.key_id.startswith("ed25519:"):
            reasons.append(f"unsupported key algorithm in {cred.key_id!r}")
            continue
        try:
            signature = decode_base64(cred.signature)
        except Exception:  # binascii.Error for bad base64
            raise Unauthorized(f"Signature for key {cred.key_id!r} is not base64") from None
        try:
            if requester is None:
                verify_key = await keyring.get_verify_key(origin, cred.key_id)
            else:
                verify_key = await keyring.get_verify_key(origin, cred.key_id, requester=requester)
        except KeyringError as exc:
            # Unknown, expired or unfetchable: this signature cannot be checked, but
            # another header may carry one that can.
            reasons.append(str(exc))
            continue
        keys.append((cred.key_id, signature, verify_key))
    if not keys:
        raise Unauthorized(f"No usable key to verify request from {origin}: {'; '.join(reasons)}")
    return HeaderAuthentication(origin, our_server_name, tuple(keys))


async def verify_request(
    method: str,
    uri: str,
    content: Mapping[str, Any] | None,
    headers: list[str],
    our_server_name: str,
    keyring: VerifyKeySource,
    *,
    requester: str | None = None,
) -> ServerName:
    """Authenticate a federation request and return its origin.

    ``method`` and ``uri`` are as received (``uri`` is the request target: path and
    query string, percent-encoding untouched). ``content`` must be the request body as
    parsed (``parse_canonical``), or ``None`` when there is no body; ``headers`` are all
    ``Authorization`` header values. Keys are looked up for "now". Raises
    ``Unauthorized`` (M_UNAUTHORIZED) with a message saying what was wrong.
    """
    auth = await authenticate_headers(headers, our_server_name, keyring, requester=requester)
    if content is None:
        return auth.verify(method, uri, None)
    return auth.verify_content(method, uri, content)


async def verify_request_json(
    method: str,
    uri: str,
    content_json: bytes | None,
    headers: list[str],
    our_server_name: str,
    keyring: VerifyKeySource,
    *,
    requester: str | None = None,
) -> ServerName:
    """``verify_request`` for a body already in canonical JSON (``content_json``).

    The caller vouches that ``content_json`` is the canonical encoding of the body it
    received (``encode_canonical_json`` of the parsed body, or bytes it cached from
    that); everything else is checked here.
    """
    auth = await authenticate_headers(headers, our_server_name, keyring, requester=requester)
    return auth.verify(method, uri, content_json)

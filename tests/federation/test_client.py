"""The federation client against real local HTTPS servers (trustme certificates)."""

from __future__ import annotations

import gzip
import socket
import time
from typing import Any

import pytest
import trustme
from pydantic import ValidationError
from signedjson.key import get_verify_key

from warden.federation.client import FederationClient
from warden.federation.errors import (
    FederationConnectError,
    FederationTimeout,
    HttpResponseError,
    InvalidDestination,
    InvalidResponse,
    PermanentFederationError,
    PermanentHttpResponseError,
    ResponseTooLarge,
    TemporaryFederationError,
    TemporaryHttpResponseError,
    TLSVerificationError,
)
from warden.federation.xmatrix import parse_authorization_headers
from warden.matrix.canonical_json import encode_canonical_json
from warden.settings import Settings


@pytest.fixture
async def server(https_server, recording_app):
    """An HTTPS server on 127.0.0.1 with a certificate for that IP."""
    return await https_server(recording_app, host="127.0.0.1")


@pytest.fixture
async def client(client_settings, client_signing_key, tls_ca_file, dns_server, https_server):
    # Depending on https_server closes the client before the servers stop, so they
    # need not wait for its idle keep-alive connections.
    settings = client_settings(federation_ca_file=tls_ca_file)
    async with FederationClient(
        settings, client_signing_key, dns_resolver=dns_server.resolver()
    ) as c:
        yield c


def _verify_x_matrix(
    header: str, key: Any, *, method: str, uri: str, destination: str, content: Any = None
) -> None:
    (creds,) = parse_authorization_headers([header])
    assert creds.origin == "warden.test"
    assert creds.destination == destination
    assert creds.key_id == "ed25519:test"
    request: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": "warden.test",
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    from unpaddedbase64 import decode_base64

    get_verify_key(key).verify(encode_canonical_json(request), decode_base64(creds.signature))


async def test_unsigned_get(client: FederationClient, server, recording_app) -> None:
    result = await client.get_json(server.address, "/_matrix/key/v2/server", signed=False)

    assert result == {"ok": True}
    (request,) = recording_app.requests
    assert request.method == "GET"
    assert request.target == "/_matrix/key/v2/server"
    assert request.headers["host"] == server.address
    assert "authorization" not in request.headers
    assert request.headers["user-agent"].startswith("Warden/")


async def test_signed_get_with_query_signs_exactly_what_is_sent(
    client: FederationClient, server, recording_app, client_signing_key
) -> None:
    await client.get_json(
        server.address,
        "/_matrix/federation/v1/event/%24abc%3Aexample.org",
        query={"a": "x y/$&=", "b": ["1", "2"]},
    )

    (request,) = recording_app.requests
    assert request.target == (
        "/_matrix/federation/v1/event/%24abc%3Aexample.org?a=x%20y%2F%24%26%3D&b=1&b=2"
    )
    _verify_x_matrix(
        request.headers["authorization"],
        client_signing_key,
        method="GET",
        uri=request.target,
        destination=server.address,
    )


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_signed_body_requests(
    client: FederationClient, server, recording_app, client_signing_key, method: str
) -> None:
    body = {"server_keys": {"notary.test": {}}, "n": 1, "s": "é"}
    send = client.post_json if method == "POST" else client.put_json

    result = await send(server.address, "/_matrix/key/v2/query", body)

    assert result == {"ok": True}
    (request,) = recording_app.requests
    assert request.method == method
    assert request.headers["content-type"] == "application/json"
    import orjson

    assert orjson.loads(request.body) == body
    _verify_x_matrix(
        request.headers["authorization"],
        client_signing_key,
        method=method,
        uri="/_matrix/key/v2/query",
        destination=server.address,
        content=body,
    )


async def test_ipv6_literal(https_server, recording_app, client: FederationClient) -> None:
    server = await https_server(recording_app, host="::1")

    assert await client.get_json(f"[::1]:{server.port}", "/x", signed=False) == {"ok": True}
    assert recording_app.requests[0].headers["host"] == f"[::1]:{server.port}"


async def test_hostname_destination_uses_its_name_for_tls_and_host(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    server = await https_server(recording_app, host=loopback_ip, names=["hs.test"])
    dns_server.add("hs.test", "A", loopback_ip)

    assert await client.get_json(f"hs.test:{server.port}", "/x") == {"ok": True}
    assert recording_app.requests[0].headers["host"] == f"hs.test:{server.port}"


async def test_default_port_8448_after_well_known_and_srv_fail(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    # Real defaults: nothing listens on loopback_ip:443 (no .well-known), no SRV, so
    # the server is reached on 8448 of its address record.
    await https_server(recording_app, host=loopback_ip, port=8448, names=["hs.test"])
    dns_server.add("hs.test", "A", loopback_ip)

    assert await client.get_json("hs.test", "/x") == {"ok": True}
    assert recording_app.requests[0].headers["host"] == "hs.test"
    assert ("_matrix-fed._tcp.hs.test", "SRV") in dns_server.queries


async def test_next_candidate_is_tried_when_one_refuses(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    server = await https_server(recording_app, host=loopback_ip, names=["hs.test"])
    dns_server.add("hs.test", "A", "127.0.0.1", loopback_ip)  # nothing on 127.0.0.1:port
    dns_server.add("hs.test", "AAAA", "::1")

    assert await client.get_json(f"hs.test:{server.port}", "/x") == {"ok": True}
    assert len(recording_app.requests) == 1


async def test_connection_refused_is_temporary(client: FederationClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FederationConnectError, match=f"127.0.0.1:{port}") as info:
        await client.get_json(f"127.0.0.1:{port}", "/x")
    assert isinstance(info.value, TemporaryFederationError)


async def test_untrusted_certificate_is_permanent(
    https_server, recording_app, client: FederationClient
) -> None:
    server = await https_server(recording_app, host="127.0.0.1", ca=trustme.CA())

    with pytest.raises(TLSVerificationError) as info:
        await client.get_json(server.address, "/x")
    assert isinstance(info.value, PermanentFederationError)
    assert recording_app.requests == []


async def test_certificate_for_another_name_is_refused(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    server = await https_server(recording_app, host=loopback_ip, names=["other.test"])
    dns_server.add("hs.test", "A", loopback_ip)

    with pytest.raises(TLSVerificationError):
        await client.get_json(f"hs.test:{server.port}", "/x")
    assert recording_app.requests == []


async def test_pooled_connection_is_never_reused_for_another_server_name(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    # One address and port, a certificate valid for a.test only. b.test (same address)
    # must get its own TLS handshake, which fails, not a.test's verified connection.
    server = await https_server(recording_app, host=loopback_ip, names=["a.test"])
    dns_server.add("a.test", "A", loopback_ip)
    dns_server.add("b.test", "A", loopback_ip)

    await client.get_json(f"a.test:{server.port}", "/1")
    with pytest.raises(TLSVerificationError):
        await client.get_json(f"b.test:{server.port}", "/2")
    await client.get_json(f"a.test:{server.port}", "/3")

    assert [r.target for r in recording_app.requests] == ["/1", "/3"]
    assert client.transport.pool_count() == 2


async def test_verification_can_be_disabled_for_development(
    https_server, recording_app, client_settings, client_signing_key
) -> None:
    server = await https_server(recording_app, host="127.0.0.1", ca=trustme.CA())
    settings = client_settings(federation_verify_tls=False)
    async with FederationClient(settings, client_signing_key) as client:
        assert await client.get_json(server.address, "/x") == {"ok": True}


async def test_proxy_environment_is_ignored(
    client: FederationClient, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert await client.get_json(server.address, "/x") == {"ok": True}


async def test_timeout_is_temporary(
    client: FederationClient, server, recording_app, canned_response
) -> None:
    recording_app.routes["/slow"] = canned_response(delay=5.0)
    started = time.monotonic()

    with pytest.raises(FederationTimeout) as info:
        await client.get_json(server.address, "/slow", timeout=0.5)

    assert time.monotonic() - started < 3.0
    assert isinstance(info.value, TemporaryFederationError)
    assert server.address in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "cls", "errcode", "error"),
    [
        (
            502,
            b'{"errcode": "M_UNKNOWN", "error": "bad gateway"}',
            TemporaryHttpResponseError,
            "M_UNKNOWN",
            "bad gateway",
        ),
        (500, b"<html>oops</html>", TemporaryHttpResponseError, None, None),
        (
            429,
            b'{"errcode": "M_LIMIT_EXCEEDED"}',
            TemporaryHttpResponseError,
            "M_LIMIT_EXCEEDED",
            None,
        ),
        (
            404,
            b'{"errcode": "M_NOT_FOUND", "error": "no such key"}',
            PermanentHttpResponseError,
            "M_NOT_FOUND",
            "no such key",
        ),
        (401, b'{"errcode": "M_UNAUTHORIZED"}', PermanentHttpResponseError, "M_UNAUTHORIZED", None),
        (403, b"[1, 2]", PermanentHttpResponseError, None, None),
        (302, b"", PermanentHttpResponseError, None, None),
    ],
)
async def test_error_statuses(
    client: FederationClient,
    server,
    recording_app,
    canned_response,
    status: int,
    body: bytes,
    cls: type[HttpResponseError],
    errcode: str | None,
    error: str | None,
) -> None:
    headers = {"content-type": "application/json", "location": "https://127.0.0.1:1/"}
    recording_app.routes["/e"] = canned_response(status=status, body=body, headers=headers)

    with pytest.raises(HttpResponseError) as info:
        await client.get_json(server.address, "/e")

    assert type(info.value) is cls
    assert (info.value.status, info.value.errcode, info.value.error) == (status, errcode, error)
    assert server.address in str(info.value)
    assert len(recording_app.requests) == 1  # redirects are not followed


@pytest.mark.parametrize("body", [b"not json", b"[1, 2, 3]", b'{"a": NaN}', b""])
async def test_invalid_json_is_permanent(
    client: FederationClient, server, recording_app, canned_response, body: bytes
) -> None:
    recording_app.routes["/bad"] = canned_response(body=body)

    with pytest.raises(InvalidResponse) as info:
        await client.get_json(server.address, "/bad")
    assert isinstance(info.value, PermanentFederationError)


@pytest.fixture
async def small_client(client_settings, client_signing_key, tls_ca_file, https_server):
    settings = client_settings(federation_ca_file=tls_ca_file)
    async with FederationClient(settings, client_signing_key, max_response_size=1024) as c:
        yield c


def _json_of_size(n: int) -> bytes:
    body = b'{"p": "' + b"x" * (n - 9) + b'"}'
    assert len(body) == n
    return body


async def test_response_at_the_limit_is_accepted(
    small_client: FederationClient, server, recording_app, canned_response
) -> None:
    recording_app.routes["/big"] = canned_response(body=_json_of_size(1024))
    assert len((await small_client.get_json(server.address, "/big"))["p"]) == 1015


@pytest.mark.parametrize("mode", ["content-length", "chunked", "gzip"])
async def test_oversized_response_is_refused(
    small_client: FederationClient, server, recording_app, canned_response, mode: str
) -> None:
    body = _json_of_size(4096)
    if mode == "content-length":
        canned = canned_response(body=body)
    elif mode == "chunked":
        canned = canned_response(chunks=[body[i : i + 512] for i in range(0, 4096, 512)])
    else:
        # Small on the wire, large once decoded: the limit applies to what we decode.
        canned = canned_response(
            body=gzip.compress(body),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
    recording_app.routes["/big"] = canned

    with pytest.raises(ResponseTooLarge) as info:
        await small_client.get_json(server.address, "/big")
    assert isinstance(info.value, PermanentFederationError)


@pytest.mark.parametrize("destination", ["", "not a name", "example.org:0", "a/b", "[::1"])
async def test_invalid_destination(client: FederationClient, destination: str, dns_server) -> None:
    with pytest.raises(InvalidDestination) as info:
        await client.get_json(destination, "/x")
    assert isinstance(info.value, PermanentFederationError)
    assert dns_server.queries == []


@pytest.mark.parametrize("path", ["relative", "/a b", "/x?y=1", "/é"])
async def test_paths_must_be_encoded_absolute_paths(
    client: FederationClient, server, recording_app, path: str
) -> None:
    with pytest.raises(ValueError, match=r"path|percent-encoded|ascii"):
        await client.get_json(server.address, path)
    assert recording_app.requests == []


def test_ca_file_setting_is_validated_at_start(tmp_path) -> None:
    with pytest.raises(ValidationError, match="federation_ca_file"):
        Settings(federation_ca_file=str(tmp_path / "missing.pem"))
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ValidationError, match="federation_ca_file"):
        Settings(federation_ca_file=str(bogus))


async def test_idle_pools_beyond_the_limit_are_closed(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    server = await https_server(recording_app, host=loopback_ip, names=["a.test", "b.test"])
    dns_server.add("a.test", "A", loopback_ip)
    dns_server.add("b.test", "A", loopback_ip)
    client.transport.max_pools = 1

    await client.get_json(f"a.test:{server.port}", "/1")
    await client.get_json(f"b.test:{server.port}", "/2")
    assert client.transport.pool_count() == 1
    await client.get_json(f"a.test:{server.port}", "/3")

    assert client.transport.pool_count() == 1
    assert [r.target for r in recording_app.requests] == ["/1", "/2", "/3"]


async def test_concurrent_requests_share_a_pool_and_release_it(
    https_server, recording_app, client: FederationClient, dns_server, loopback_ip
) -> None:
    import asyncio

    server = await https_server(recording_app, host=loopback_ip, names=["a.test", "b.test"])
    dns_server.add("a.test", "A", loopback_ip)
    dns_server.add("b.test", "A", loopback_ip)

    results = await asyncio.gather(
        *(client.get_json(f"a.test:{server.port}", f"/{i}") for i in range(20))
    )
    assert results == [{"ok": True}] * 20
    assert client.transport.pool_count() == 1

    # Every response released its pool: it is idle, so the limit can evict it.
    client.transport.max_pools = 1
    await client.get_json(f"b.test:{server.port}", "/b")
    assert client.transport.pool_count() == 1


async def test_busy_pools_are_not_evicted(
    https_server, recording_app, canned_response, client: FederationClient, dns_server, loopback_ip
) -> None:
    import asyncio

    server = await https_server(recording_app, host=loopback_ip, names=["a.test", "b.test"])
    dns_server.add("a.test", "A", loopback_ip)
    dns_server.add("b.test", "A", loopback_ip)
    recording_app.routes["/slow"] = canned_response(body=b'{"slow": true}', delay=0.5)
    client.transport.max_pools = 1

    slow = asyncio.create_task(client.get_json(f"a.test:{server.port}", "/slow"))
    while not recording_app.requests:
        await asyncio.sleep(0.01)
    assert await client.get_json(f"b.test:{server.port}", "/fast") == {"ok": True}
    assert client.transport.pool_count() == 2  # a.test's pool was busy: kept
    assert await slow == {"slow": True}

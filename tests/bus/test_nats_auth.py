"""NATS authentication: credentials in the URL, NKey seed files, TLS CA checks, and
that no secret reaches an error message (M10 of the security review).

Each test starts its own nats-server (the binary `warden dev` embeds) with an
authorization block, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nacl.utils
import nkeys
import pytest
import trustme

from warden.bus.connection import NatsAuth, connect_nats, nats_auth, without_credentials
from warden.dev.embedded import nats_server_binary
from warden.dev.procs import free_port
from warden.settings import Settings


def _start(conf: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf_path = tmp_path / "nats.conf"
    conf_path.write_text(f"listen: 127.0.0.1:{port}\n{conf}\n")
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(conf_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def password_nats(tmp_path: Path) -> Iterator[int]:
    """A NATS server that admits user ``warden`` with password ``s3cret-pw``."""
    yield from _start('authorization { user: warden, password: "s3cret-pw" }', tmp_path)


@pytest.fixture
def nkey_user() -> tuple[str, str]:
    """A fresh user NKey: (seed, public key)."""
    seed = nkeys.encode_seed(nacl.utils.random(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    return seed, public


@pytest.fixture
def nkey_nats(tmp_path: Path, nkey_user: tuple[str, str]) -> Iterator[int]:
    """A NATS server that admits only the fixture's NKey user."""
    yield from _start(f"authorization {{ users = [ {{ nkey: {nkey_user[1]} }} ] }}", tmp_path)


async def test_credentials_in_the_url_are_used(password_nats: int) -> None:
    nc = await connect_nats(
        f"nats://warden:s3cret-pw@127.0.0.1:{password_nats}", name="t", initial_timeout=10
    )
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()


async def test_a_refused_login_fails_start_up_without_showing_the_password(
    password_nats: int,
) -> None:
    with pytest.raises(TimeoutError) as raised:
        await connect_nats(
            f"nats://warden:wrong-pw@127.0.0.1:{password_nats}", name="t", initial_timeout=3
        )
    message = str(raised.value)
    assert "wrong-pw" not in message
    assert "warden:***@127.0.0.1" in message
    # The server's own reason is carried, so an operator sees why.
    assert "authorization" in message.lower()


async def test_an_nkey_seed_file_authenticates(
    nkey_nats: int, nkey_user: tuple[str, str], tmp_path: Path
) -> None:
    seed_file = tmp_path / "warden.nk"
    seed_file.write_text(nkey_user[0] + "\n")
    os.chmod(seed_file, 0o600)
    url = f"nats://127.0.0.1:{nkey_nats}"
    nc = await connect_nats(url, name="t", auth=NatsAuth(nkey_seed_file=str(seed_file)))
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()
    # Without the seed the same server refuses.
    with pytest.raises(TimeoutError):
        await connect_nats(url, name="t", initial_timeout=2)


async def test_a_ca_file_with_a_plain_url_is_refused_rather_than_silently_unencrypted(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="tls://"):
        await connect_nats(
            "nats://127.0.0.1:1", name="t", auth=NatsAuth(tls_ca_file=str(tmp_path / "ca.pem"))
        )


async def test_two_credential_files_are_refused() -> None:
    with pytest.raises(ValueError, match="at most one"):
        await connect_nats("nats://127.0.0.1:1", name="t", auth=NatsAuth("a", "b"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://u:p@h:4222", "nats://u:***@h:4222"),
        ("nats://tok3n@h:4222", "nats://***@h:4222"),
        ("tls://u:p@a:1,tls://u:p@b:2", "tls://u:***@a:1,tls://u:***@b:2"),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("postgres://w:pw@db/warden?sslmode=require", "postgres://w:***@db/warden?sslmode=require"),
    ],
)
def test_urls_are_shown_without_secrets(url: str, shown: str) -> None:
    assert without_credentials(url) == shown


def test_unreadable_nats_secret_files_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nats_creds_file"):
        Settings(nats_creds_file=str(tmp_path / "missing.creds"))


@pytest.fixture
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_cert_nats(tmp_path: Path, tls_ca: trustme.CA) -> Iterator[int]:
    """A NATS server on TLS that admits only clients with a certificate from ``tls_ca``."""
    server = tls_ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    tls_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    yield from _start(
        f'tls {{ cert_file: "{tmp_path / "server.pem"}", key_file: "{tmp_path / "server.key"}",'
        f' ca_file: "{tmp_path / "ca.pem"}", verify: true, timeout: 2 }}',
        tmp_path,
    )


def _client_files(tls_ca: trustme.CA, directory: Path) -> tuple[str, str, str]:
    """(CA bundle, client certificate, client key) written under ``directory``."""
    directory.mkdir()
    client = tls_ca.issue_cert("warden-gateway")
    ca, cert, key = directory / "ca.pem", directory / "client.pem", directory / "client.key"
    tls_ca.cert_pem.write_to_path(str(ca))
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    return str(ca), str(cert), str(key)


async def test_a_client_certificate_from_the_settings_is_presented(
    client_cert_nats: int, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    ca, cert, key = _client_files(tls_ca, tmp_path / "client")
    settings = Settings(
        nats_url=f"tls://127.0.0.1:{client_cert_nats}",
        nats_tls_ca_file=ca,
        nats_tls_cert_file=cert,
        nats_tls_key_file=key,
    )
    nc = await connect_nats(
        settings.nats_url, name="t", initial_timeout=10, auth=nats_auth(settings)
    )
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()


async def test_a_certificate_file_holding_the_key_too_needs_no_key_file(
    client_cert_nats: int, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    ca, cert, key = _client_files(tls_ca, tmp_path / "client")
    combined = tmp_path / "combined.pem"
    combined.write_text(Path(key).read_text() + Path(cert).read_text())
    settings = Settings(
        nats_url=f"tls://127.0.0.1:{client_cert_nats}",
        nats_tls_ca_file=ca,
        nats_tls_cert_file=str(combined),
    )
    nc = await connect_nats(
        settings.nats_url, name="t", initial_timeout=10, auth=nats_auth(settings)
    )
    try:
        await nc.flush(timeout=2)
    finally:
        await nc.close()


async def test_without_a_client_certificate_the_server_refuses(
    client_cert_nats: int, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    ca, _, _ = _client_files(tls_ca, tmp_path / "client")
    with pytest.raises(TimeoutError):
        await connect_nats(
            f"tls://127.0.0.1:{client_cert_nats}",
            name="t",
            initial_timeout=3,
            auth=NatsAuth(tls_ca_file=ca),
        )


async def test_a_certificate_from_another_ca_is_refused(
    client_cert_nats: int, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    ca, _, _ = _client_files(tls_ca, tmp_path / "client")
    _, cert, key = _client_files(trustme.CA(), tmp_path / "stranger")
    with pytest.raises(TimeoutError):
        await connect_nats(
            f"tls://127.0.0.1:{client_cert_nats}",
            name="t",
            initial_timeout=3,
            auth=NatsAuth(tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key),
        )


async def test_a_client_certificate_with_a_plain_url_is_refused(
    tls_ca: trustme.CA, tmp_path: Path
) -> None:
    _, cert, key = _client_files(tls_ca, tmp_path / "client")
    with pytest.raises(ValueError, match=r"PS_NATS_TLS_CERT_FILE.*tls://"):
        await connect_nats(
            "nats://127.0.0.1:1",
            name="t",
            auth=NatsAuth(tls_cert_file=cert, tls_key_file=key),
        )


def test_client_certificate_settings_are_checked_at_start(
    tls_ca: trustme.CA, tmp_path: Path
) -> None:
    _, cert, key = _client_files(tls_ca, tmp_path / "client")
    with pytest.raises(ValueError, match="PS_NATS_TLS_CERT_FILE is not"):
        Settings(nats_tls_key_file=key)
    # A certificate file without its key, and no key file: refused at start.
    with pytest.raises(ValueError, match="cannot load client certificate"):
        Settings(nats_tls_cert_file=cert)
    with pytest.raises(ValueError, match="nats_tls_key_file"):
        Settings(nats_tls_cert_file=cert, nats_tls_key_file=str(tmp_path / "missing.key"))
    assert Settings(nats_tls_cert_file=cert, nats_tls_key_file=key).nats_tls_key_file == key


# --- operator mode: a user JWT and its seed in a .creds file (PS_NATS_CREDS_FILE) ---


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _new_key(prefix: int) -> tuple[nkeys.KeyPair, str, str]:
    seed = nkeys.encode_seed(nacl.utils.random(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return pair, seed.decode(), pair.public_key.decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, object]) -> str:
    """A NATS JWT (v2) as nsc writes it: ed25519-nkey, signed by the issuer's NKey."""
    import base64
    import hashlib
    import json

    claims: dict[str, object] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": nats_claims,
    }
    digest = hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{_b64(signature)}"


def _creds(user_jwt: str, seed: str) -> str:
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )


ACCOUNT_LIMITS = {
    "limits": {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    },
    "default_permissions": {"pub": {}, "sub": {}},
    "type": "account",
    "version": 2,
}
USER_LIMITS = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}


@pytest.fixture
def operator_mode(tmp_path: Path) -> Iterator[tuple[int, nkeys.KeyPair]]:
    """A nats-server in operator mode trusting one account; yields (port, account key)."""
    operator, _, operator_pub = _new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account, _, account_pub = _new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = _jwt(operator, operator_pub, "op", {"type": "operator", "version": 2})
    account_jwt = _jwt(operator, account_pub, "warden", ACCOUNT_LIMITS)
    conf = (
        f"operator: {operator_jwt}\nresolver: MEMORY\n"
        f"resolver_preload: {{ {account_pub}: {account_jwt} }}\n"
    )
    for port in _start(conf, tmp_path):
        yield port, account


def _user_creds(account: nkeys.KeyPair, path: Path) -> Path:
    _, seed, user_pub = _new_key(nkeys.PREFIX_BYTE_USER)
    user_jwt = _jwt(account, user_pub, "warden", {**USER_LIMITS, "type": "user", "version": 2})
    path.write_text(_creds(user_jwt, seed))
    os.chmod(path, 0o600)
    return path


async def test_a_creds_file_authenticates_in_operator_mode(
    operator_mode: tuple[int, nkeys.KeyPair], tmp_path: Path
) -> None:
    port, account = operator_mode
    creds = _user_creds(account, tmp_path / "warden.creds")
    settings = Settings(nats_url=f"nats://127.0.0.1:{port}", nats_creds_file=str(creds))
    nc = await connect_nats(settings.nats_url, name="t", auth=nats_auth(settings))
    try:
        await nc.publish("warden.test.creds", b"x")
        await nc.flush(timeout=2)
    finally:
        await nc.close()
    # A user signed by an account the server does not trust is refused, as is no user.
    stranger, _, _ = _new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    other = _user_creds(stranger, tmp_path / "other.creds")
    url = f"nats://127.0.0.1:{port}"
    with pytest.raises(TimeoutError):
        await connect_nats(url, name="t", auth=NatsAuth(creds_file=str(other)), initial_timeout=2)
    with pytest.raises(TimeoutError):
        await connect_nats(url, name="t", initial_timeout=2)


async def test_the_servers_refusal_is_not_hidden_by_a_later_connection_reset(
    password_nats: int,
) -> None:
    """nats-server closes right after refusing a login, so a retry may end in a bare TCP
    reset instead of the refusal. A proxy in front of the real server passes the first
    connection through (refused) and resets every later one: the error still says why.
    """
    connections = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections > 1:
            sock = client_w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client_w.transport.abort()
            return
        server_r, server_w = await asyncio.open_connection("127.0.0.1", password_nats)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError) as raised:
            await connect_nats(
                f"nats://warden:wrong-pw@127.0.0.1:{port}", name="t", initial_timeout=2.5
            )
    finally:
        proxy.close()
    assert connections >= 2  # the later attempts were reset
    message = str(raised.value)
    assert "authorization violation" in message.lower()
    assert "wrong-pw" not in message

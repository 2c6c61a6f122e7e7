"""Fixtures for the end-to-end tests against a real Synapse.

Each test module gets one Synapse (started once, stopped at the module's end) and, when
it asks for one, one Warden stack: the tests of a module run in order and share state, so
the whole suite runs in minutes. Synapse runs from its own venv
(``tests/synapse/synapse_venv.py``, created under ``.warden/`` on first use).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme

from tests.synapse.second_origin import SecondOrigin
from tests.synapse.synapse_client import MatrixClient
from tests.synapse.synapse_server import SynapseServer, start_synapse
from tests.synapse.synapse_venv import ensure_synapse_python


@pytest.fixture(scope="session")
def synapse_python() -> Path:
    """Synapse's interpreter (its venv is built on first use, then reused)."""
    started = time.monotonic()
    python = ensure_synapse_python()
    print(f"synapse venv: {python} ({time.monotonic() - started:.1f}s)")
    return python


@pytest.fixture(scope="module")
def e2e_ca() -> trustme.CA:
    """The CA every party's certificate comes from (Synapse, Warden, the second origin)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory for this module's servers."""
    return tmp_path_factory.mktemp("synapse-e2e")


@pytest.fixture(scope="module")
def e2e_ca_file(e2e_ca: trustme.CA, e2e_dir: Path) -> str:
    """``e2e_ca``'s certificate as a PEM file."""
    path = e2e_dir / "ca.pem"
    e2e_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def synapse(synapse_python: Path, e2e_ca: trustme.CA, e2e_dir: Path) -> Iterator[SynapseServer]:
    """A running Synapse for the module; its log is at ``synapse.log_path``."""
    started = time.monotonic()
    server = start_synapse(synapse_python, e2e_dir / "synapse", e2e_ca)
    print(f"synapse {server.server_name} ready ({time.monotonic() - started:.1f}s)")
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"Synapse exited with {code}:\n{server.log()[-5000:]}"


@pytest.fixture(scope="module")
def second_origin(e2e_ca: trustme.CA, e2e_dir: Path) -> Iterator[SecondOrigin]:
    """The tests' own homeserver, serving HTTPS on loopback."""
    origin = SecondOrigin(e2e_ca, e2e_dir / "origin")
    origin.start()
    try:
        yield origin
    finally:
        origin.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice(synapse: SynapseServer) -> AsyncIterator[MatrixClient]:
    """A Synapse admin user who creates the rooms."""
    user = synapse.users.get("alice") or synapse.register("alice", admin=True)
    client = MatrixClient(synapse.client_url, user.access_token, user.user_id)
    try:
        yield client
    finally:
        await client.aclose()

"""Fixtures for the `warden dev` tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from warden.dev.procs import free_port


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (so a URL using it does not answer)."""
    return free_port()


@pytest.fixture(autouse=True)
def _remove_outside_pg_data(tmp_path: Path) -> Iterator[None]:
    """Delete a cluster placed outside tmp_path (see ``embedded._data_dir``) afterwards."""
    yield
    for link in tmp_path.rglob("data"):
        outside = link.resolve().parent
        if link.is_symlink() and outside.name.startswith("warden-dev-pg-"):
            shutil.rmtree(outside, ignore_errors=True)

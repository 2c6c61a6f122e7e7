"""Synapse's own virtual environment for the end-to-end tests.

Synapse runs from a venv of its own (``.warden/synapse-venv``), created once with
``python -m venv`` and ``pip install matrix-synapse==<SYNAPSE_VERSION>`` (with the
``synapse-http-antispam`` module beside it) and reused by
every later run: Warden's dev venv never has to agree with Synapse's dependency pins, and
the homeserver under test is the one a homeserver admin installs from PyPI.

A stamp file records what was installed; a venv whose stamp does not match (another
Synapse version, an interrupted install) is rebuilt. A file lock serialises concurrent
builders. ``WARDEN_SYNAPSE_PYTHON`` names an interpreter to use instead (one that already
has Synapse), which skips the build entirely.

Prebuild it with ``.venv/bin/python -m tests.synapse.synapse_venv``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SYNAPSE_VERSION = "1.163.2"
# The spam-checker module that forwards callbacks to Warden (tests/synapse/
# test_synapse_antispam.py); installed beside Synapse, loaded only where configured.
ANTISPAM_MODULE = "synapse-http-antispam==0.5.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV_DIR = REPO_ROOT / ".warden" / "synapse-venv"
STAMP_NAME = ".warden-synapse-installed"
# Generous: a fresh machine downloads Synapse and its ~60 dependencies from PyPI.
INSTALL_TIMEOUT_SECONDS = 900


class SynapseVenvError(RuntimeError):
    """Synapse's venv could not be created; the message carries pip's output."""


def _synapse_stamp() -> str:
    return f"matrix-synapse=={SYNAPSE_VERSION} python={sys.version_info[0]}.{sys.version_info[1]}\n"


def _stamp_text() -> str:
    return _synapse_stamp() + ANTISPAM_MODULE + "\n"


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _is_ready(venv_dir: Path) -> bool:
    stamp = venv_dir / STAMP_NAME
    return _venv_python(venv_dir).exists() and stamp.exists() and stamp.read_text() == _stamp_text()


def _run(cmd: list[str]) -> None:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
        raise SynapseVenvError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )


def _pip_install(venv_dir: Path, *requirements: str) -> None:
    python = str(_venv_python(venv_dir))
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements])


def ensure_synapse_python(venv_dir: Path = DEFAULT_VENV_DIR) -> Path:
    """The interpreter to run Synapse with, creating its venv first if needed.

    Returns ``$WARDEN_SYNAPSE_PYTHON`` when set. Otherwise creates (or repairs) the venv
    at ``venv_dir`` and returns its ``bin/python``. Raises ``SynapseVenvError`` when
    ``venv`` or ``pip`` fails.
    """
    override = os.environ.get("WARDEN_SYNAPSE_PYTHON")
    if override:
        return Path(override)
    if _is_ready(venv_dir):
        return _venv_python(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv_dir.parent / (venv_dir.name + ".lock")
    with open(lock_path, "w") as lock:
        # Another test session may be building it right now: wait for it, then reuse.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_ready(venv_dir):
            return _venv_python(venv_dir)
        stamp = venv_dir / STAMP_NAME
        if stamp.exists() and stamp.read_text() == _synapse_stamp():
            # Synapse is there already (a venv from before the module): add the module.
            _pip_install(venv_dir, ANTISPAM_MODULE)
            stamp.write_text(_stamp_text())
            return _venv_python(venv_dir)
        if venv_dir.exists():
            shutil.rmtree(venv_dir)
        _run([sys.executable, "-m", "venv", str(venv_dir)])
        _pip_install(venv_dir, f"matrix-synapse=={SYNAPSE_VERSION}", ANTISPAM_MODULE)
        (venv_dir / STAMP_NAME).write_text(_stamp_text())
    return _venv_python(venv_dir)


def main() -> int:
    """Create the venv (if needed) and print the interpreter and how long it took."""
    started = time.monotonic()
    python = ensure_synapse_python()
    print(f"{python} ready in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

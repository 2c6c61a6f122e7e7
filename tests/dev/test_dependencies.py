"""The dependency declarations: the lock pins every dependency within pyproject's bounds,
and the lower bounds admit no release known to break Warden (operations review gap 3)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs.extend(Requirement(r) for r in extra)
    return reqs


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_every_dependency_within_its_bounds() -> None:
    pins = _lock()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock (run make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside {req.specifier}"
        )


def test_lower_bounds_exclude_releases_that_break_warden() -> None:
    """Each of these was installed at its old lower bound and crashed at import or start."""
    too_old = {
        "pydantic-settings": Version("2.6.1"),  # no NoDecode
        "python-json-logger": Version("3.0.1"),  # no pythonjsonlogger.json
        "redis": Version("5.0.0"),  # no aclose()
    }
    declared: dict[str, Requirement] = {
        canonicalize_name(r.name): r for r in _pyproject_requirements()
    }
    for name, version in too_old.items():
        assert not declared[name].specifier.contains(version), f"{name} admits {version}"


def test_uvicorn_is_bounded_above() -> None:
    """warden.runtime.http_writes relies on uvicorn internals: a new release must be tried."""
    (uvicorn,) = [r for r in _pyproject_requirements() if r.name == "uvicorn"]
    assert any(spec.operator == "<" for spec in uvicorn.specifier)

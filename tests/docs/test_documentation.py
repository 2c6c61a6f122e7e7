"""The README is the front page and docs/ the reference: every relative link resolves, and
the reference tables list exactly what the code has (settings, filter keys, filters).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from warden.filters.registry import FILTERS
from warden.policy.config import known_keys
from warden.secret_files import FILE_SUFFIX, SECRET_SETTINGS
from warden.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
# Inline links [text](target); reference definitions and links in code are not links.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor the headings of a Markdown file give (repeats get -1, -2, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        match = re.match(r"^#{1,6} (.+)$", line)
        if match and not fence:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_the_slugs_are_githubs() -> None:
    assert slug("Server-centric API (`/_policyserv/v1`)") == "server-centric-api-_policyservv1"
    assert slug("Redis: Sentinel, not Cluster") == "redis-sentinel-not-cluster"
    assert slug("The `warden` command") == "the-warden-command"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_anchor_that_exist(page: Path) -> None:
    broken = []
    links = LINK.findall(prose(page.read_text()))
    for target in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no anchor #{anchor} in {dest.name}")
    assert broken == []
    if page.name == "README.md":
        assert len(links) > 10  # the front page links to the reference


def test_the_readme_is_the_front_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# Warden\n\n```sh\nmake run ")
    assert "\nmake test " in readme.split("```")[1]
    headings = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    for kept in ("Status", "Architecture", "Documentation", "Performance"):
        assert kept in headings
    # The reference lives in docs/: no settings or metrics tables on the front page.
    assert not re.search(r"^\| `(PS|warden)_\w+` \|", readme, re.MULTILINE)
    for doc in ("operator-guide", "settings", "apis", "filters", "security-model", "runbooks"):
        assert f"](docs/{doc}.md)" in readme, doc


def table_names(text: str, prefix: str) -> set[str]:
    """The backticked names in the first cell of the table rows of a Markdown text."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith(f"| `{prefix}"):
            names |= set(re.findall(rf"`({prefix}\w+)`", line.split("|")[1]))
    return names


def test_the_settings_reference_lists_every_setting_and_no_other() -> None:
    fields = {ENV_PREFIX.upper() + name.upper() for name in Settings.model_fields}
    rows = table_names((DOCS / "settings.md").read_text(), "PS_")
    assert fields - rows == set(), "settings missing from docs/settings.md"
    files = {f"PS_{name.upper()}{FILE_SUFFIX}" for name in SECRET_SETTINGS}
    # Instance-only filter keys sit with the filter's settings (no community can set them).
    filter_defaults = {key.env_var for key in known_keys().values()}
    assert rows - fields - files - filter_defaults == set(), "rows for unknown settings"


def test_the_filters_reference_names_every_filter_and_key() -> None:
    text = (DOCS / "filters.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \| \d \|", text, re.MULTILINE))
    registered = {f.name for f in FILTERS}
    assert rows == registered
    for key in known_keys().values():
        filter_name = key.name.removesuffix("_fail_secure")
        if key.name.endswith("_fail_secure") and filter_name in rows:
            continue  # documented by the rule "<name>_fail_secure"
        if key.name.endswith("_fail_secure") and filter_name not in registered:
            continue  # a filter a test module defined (not registered): not Warden's
        assert f"`{key.name}`" in text, key.name
    assert "`<name>_fail_secure`" in text


def test_the_policyserv_metrics_map_names_warden_metrics_that_exist() -> None:
    """Operations review gap 14: dashboards moving over need each policyserv metric's
    Warden counterpart; every name given is in the operator guide's metrics table, which
    tests/deploy/test_observability.py checks against the code."""
    text = (DOCS / "moving-from-policyserv.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `policyserv_")]
    assert len(rows) >= 12
    table = set(
        re.findall(
            r"^\| `(warden_\w+)` \|",
            (DOCS / "operator-guide.md").read_text(),
            re.MULTILINE,
        )
    )
    for row in rows:
        named = set(re.findall(r"`(warden_\w+)`", row.split("|")[2]))
        assert named <= table, row


def test_the_review_status_covers_every_p1_and_p2_gap_and_names_real_tests() -> None:
    text = (DOCS / "operations-review-status.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (P[12][^|]*) \|", text, re.MULTILINE)
    assert [int(n) for n, _ in rows] == list(range(1, 17))
    sections = re.findall(r"^## (\d+)\. ", text, re.MULTILINE)
    assert [int(n) for n in sections] == list(range(1, 17))
    for n, _ in rows:
        section = text.split(f"\n## {n}. ", 1)[1].split("\n## ", 1)[0]
        assert "**Where:**" in section and "**Tests:**" in section, n
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text)
    assert len(refs) > 60
    for path, name in refs:
        source = ROOT / path
        assert source.exists(), path
        if name:
            assert re.search(rf"^(async )?def {name}\(", source.read_text(), re.MULTILINE), (
                f"{path}::{name}"
            )
    for path in re.findall(r"`((?:deploy|libs|docs)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), path

"""The Grafana dashboard and the Prometheus alert rules: valid, unit-tested with promtool,
documented, and built only from metrics the services really export.

promtool comes from Debian's ``prometheus`` package (``make install-promtool``; ``make
test`` and ``.ci/run`` install it when it is missing). Without it these tests fail.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "warden-rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "warden-rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "warden.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
SERVICE_PACKAGES = (
    "warden",
    "warden_gateway",
    "warden_filter_worker",
    "warden_moderator",
    "warden_webhooks",
)
# Series Prometheus makes itself for every target, not exported by a service.
SCRAPE_SERIES = {"up"}

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    # Aggregation operators: ``sum by (x) (...)`` puts a word between name and parenthesis.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, "promtool is missing: run `make install-promtool`"
    return path


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a simple, sufficient parser)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    # Label lists of aggregations and vector matching.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*(\(?))", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def exported_names() -> set[str]:
    """Every series name the services can export (all their modules imported)."""
    for top in SERVICE_PACKAGES:
        package = importlib.import_module(top)
        for module in pkgutil.walk_packages(package.__path__, f"{top}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(f"{family.name}{s}" for s in ("", "_sum", "_count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def exported_labels() -> dict[str, set[str]]:
    """The label names of each exported series name (after ``exported_names``)."""
    out: dict[str, set[str]] = {}
    for name, collector in REGISTRY._names_to_collectors.items():
        labels = getattr(collector, "_labelnames", None)
        if labels is None:  # a custom collector: its families say
            describe = getattr(collector, "describe", None) or collector.collect
            family = next((f for f in describe() if name.startswith(f.name)), None)
            labels = getattr(family, "_labelnames", None)
            if labels is None:  # a plain Metric (as a test's collector yields): its samples'
                samples = family.samples if family is not None else []
                labels = {k for sample in samples for k in sample.labels} - {"le", "quantile"}
        out[name] = set(labels) | ({"le"} if name.endswith("_bucket") else set())
    return out


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched on it) of each ``metric{...}`` selector."""
    out = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", match.group(2)))
        out.append((match.group(1), labels))
    return out


def test_the_metric_name_parser_finds_names_and_skips_functions_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{x="b c"}[5m])))'
        " / on (instance) group_left (service) b_info unless max(c) > bool 1"
    )
    assert metric_names(expr) == {"a_bucket", "b_info", "c"}


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested not firing"


def test_every_alert_has_severity_annotations_and_a_runbook_entry() -> None:
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower().replace(" ", "-"))
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbooks.md", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no PromQL checker of its own: each query becomes a recording rule.
    records = [
        {"record": f"warden:dashboard:query{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shape() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] == "Warden"
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for topic in (
        "/sign requests",
        "/sign latency",
        "refusals by harm",
        "verdicts by class",
        "batch sizes",
        "queue wait",
        "consumer lag",
        "redeliveries",
        "key fetches",
        "rate-limit",
        "dependency health",
        "cpu",
        "memory",
        "event-loop lag",
        "postgresql pool",
    ):
        assert topic in titles, topic


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_used_is_exported_by_the_services(source: str) -> None:
    if source == "dashboard":
        queries = dashboard_targets()
    else:
        queries = [(r.get("alert") or r["record"], r["expr"]) for r in rules()]
    exported = exported_names() | SCRAPE_SERIES
    # The default collectors (process_*, python_*) are part of what is checked against.
    assert "process_cpu_seconds_total" in exported
    assert "process_resident_memory_bytes" in exported
    used: dict[str, set[str]] = {}
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(where)
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert unknown == {}
    # Label matchers name labels the metric has (or the target labels Prometheus adds).
    labels = exported_labels()
    for where, expr in queries:
        for name, matched in selector_labels(expr):
            if name in SCRAPE_SERIES:
                continue
            assert matched <= labels[name] | {"instance", "job"}, f"{where}: {name}{matched}"


def make_recipe(target: str) -> str:
    """The recipe lines of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line)
    return "\n".join(recipe)


def test_make_test_and_ci_install_promtool_when_missing() -> None:
    install = make_recipe("install-promtool")
    assert "apt-get install -y" in install and "--no-install-recommends prometheus" in install
    assert "exit 1" in install  # a failed install says so; the tests then fail, never skip
    test = make_recipe("test")
    assert test.index("install-promtool") < test.index("pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("install-promtool") < ci.index("exec make test")


def test_the_operator_guides_metrics_table_lists_exactly_the_exported_metrics() -> None:
    exported_names()  # imports every module that defines metrics
    families = set()
    for family in REGISTRY.collect():
        if family.name.startswith("warden_"):
            suffix = "_total" if family.type == "counter" else ""
            families.add(f"{family.name}{suffix}")
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    listed = set(re.findall(r"^\| `(warden_\w+)` \|", guide, re.MULTILINE))
    assert families - listed == set(), "metrics missing from the operator guide's table"
    assert listed - families == set(), "operator guide rows for metrics the code does not have"

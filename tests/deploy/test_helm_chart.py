"""The Helm chart (deploy/helm/warden): linted, rendered offline with Helm's own library
(helm-python-sdk, no helm binary or cluster) and validated strictly against several
Kubernetes versions' schemas (kubernetes-validate).

Operations review gaps 8, 11, 13, 17, 18 and 23: per-service values, credentials as values
or references to existing Secrets, a ServiceMonitor only when the CRD exists, a
NetworkPolicy, an Ingress or HTTPRoute, a separate admin Service, the migration hook,
instance and version labels, two releases in one namespace.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from warden.cli import build_parser
from warden.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "warden"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S_VERSIONS = ["1.29.0", "1.31.0", "1.33.0"]
# What `helm template --api-versions monitoring.coreos.com/v1` declares.
MONITORING = ["monitoring.coreos.com/v1"]
# Kinds of CRDs kubernetes-validate has no schema for; checked by the tests below instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
COMPONENTS = ["gateway", "filter-worker", "moderator", "webhooks"]

Doc = dict[str, Any]


def ci_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return values


def render(
    values: dict[str, Any] | None = None,
    *,
    release: str = "one",
    namespace: str = "warden",
    api_versions: Iterable[str] = (),
    kube_version: str = "1.33.0",
) -> list[Doc]:
    """Render the chart like `helm template` and return its objects (hooks included).

    Chart.render of helm-python-sdk 0.2 does not pass --api-versions/--kube-version
    through, but the native helm_render it wraps accepts both options.
    """
    chart = helm_python.Chart.load(CHART)
    try:
        opts = {
            "name": release,
            "namespace": namespace,
            "is_install": True,
            "api_versions": list(api_versions),
            "kube_version": kube_version,
        }
        raw = _native.call_string(
            "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)
        )
    finally:
        chart.close()
    docs: list[Doc] = []
    for path, text in sorted(json.loads(raw).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_labels(deployment: Doc) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def container(deployment: Doc) -> Doc:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    (c,) = containers
    return c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def env_of(c: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_refs(docs: list[Doc]) -> set[tuple[str, str]]:
    """Every (Secret name, key) a pod of these objects reads."""
    refs: set[tuple[str, str]] = set()
    for d in docs:
        if d["kind"] not in ("Deployment", "Job"):
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        for v in spec.get("volumes", []):
            for source in v.get("projected", {}).get("sources", []):
                for item in source["secret"]["items"]:
                    refs.add((source["secret"]["name"], item["key"]))
    return refs


SCENARIOS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "defaults": ({}, []),
    "existing-secrets": (ci_values("existing-secrets"), []),
    "inline-values-and-ingress": (ci_values("inline"), []),
    "service-monitor": ({}, MONITORING),
    "generated-keys": (ci_values("generated-keys"), []),
    "no-hook-no-netpol": (
        {"migrations": {"hook": {"enabled": False}}, "networkPolicy": {"enabled": False}},
        [],
    ),
    "http-route-ipv6": (
        {
            "httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gw"}]},
            "listenAddress": "::",
            "moderator": {"enabled": False},
            "gateway": {"autoscaling": {"enabled": False}, "replicas": 3},
        },
        [],
    ),
}


def test_lint_is_clean_with_defaults_and_every_ci_values_file() -> None:
    for values in [None, *(yaml.safe_load(p.read_text()) for p in CI_VALUES)]:
        report = helm_python.lint(CHART, values, strict=True, kube_version="v1.31.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (values, report)
    assert len(CI_VALUES) == 3


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_validates_strictly(scenario: str, k8s: str) -> None:
    values, api_versions = SCENARIOS[scenario]
    docs = render(values, api_versions=api_versions, kube_version=k8s)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, k8s, strict=True)


def test_the_chart_refuses_clusters_older_than_it_supports() -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape("needs Kubernetes >=1.29")):
        render(kube_version="1.28.0")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_selectors_match_the_pods_they_are_meant_for(scenario: str) -> None:
    values, api_versions = SCENARIOS[scenario]
    docs = render(values, api_versions=api_versions)
    deployments = of_kind(docs, "Deployment")
    by_name = {d["metadata"]["name"]: d for d in deployments}
    for d in deployments:
        own = pod_labels(d)
        assert selects(d["spec"]["selector"]["matchLabels"], own)
        others = [pod_labels(o) for o in deployments if o is not d]
        assert not any(selects(d["spec"]["selector"]["matchLabels"], o) for o in others)
        for tsc in d["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert tsc["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
            assert tsc["matchLabelKeys"] == ["pod-template-hash"]
    for svc in of_kind(docs, "Service"):
        targets = [d for d in deployments if selects(svc["spec"]["selector"], pod_labels(d))]
        assert targets, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            for d in targets:
                names = {p["name"]: p["containerPort"] for p in container(d)["ports"]}
                assert port["targetPort"] in names, (svc["metadata"]["name"], d["metadata"]["name"])
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        matched = [
            d for d in deployments if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(d))
        ]
        assert [m["metadata"]["name"] for m in matched] == [pdb["metadata"]["name"]]
        assert "minAvailable" not in pdb["spec"]  # a single replica must not block drains
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = by_name[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"]  # the autoscaler owns the count
    for d in deployments:
        autoscaled = any(
            h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
            for h in of_kind(docs, "HorizontalPodAutoscaler")
        )
        assert autoscaled or d["spec"]["replicas"] >= 1
    for np in of_kind(docs, "NetworkPolicy"):
        assert any(
            selects(np["spec"]["podSelector"]["matchLabels"], pod_labels(d))
            for d in [*deployments, *of_kind(docs, "Job")]
        )


def test_every_object_has_instance_and_version_labels() -> None:
    values = {"image": {"tag": "1.2.3+build.4"}}
    for doc in render(values, api_versions=MONITORING):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "one"
        assert labels["app.kubernetes.io/version"] == "1.2.3_build.4"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for d in of_kind(render(values), "Deployment"):
        assert "app.kubernetes.io/version" not in d["spec"]["selector"]["matchLabels"]
        assert container(d)["image"] == "warden:1.2.3+build.4"


def test_an_image_digest_pins_the_image() -> None:
    digest = "sha256:" + "ab" * 32
    docs = render({"image": {"registry": "ghcr.io", "repository": "org/warden", "digest": digest}})
    for d in [*of_kind(docs, "Deployment"), *of_kind(docs, "Job")]:
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"ghcr.io/org/warden@{digest}"


def test_two_releases_in_one_namespace_do_not_collide() -> None:
    first = render(ci_values("inline"), release="one", api_versions=MONITORING)
    second = render(ci_values("inline"), release="two", api_versions=MONITORING)
    assert not {(d["kind"], d["metadata"]["name"]) for d in first} & {
        (d["kind"], d["metadata"]["name"]) for d in second
    }
    for docs, other in ((first, second), (second, first)):
        other_pods = [pod_labels(d) for d in of_kind(other, "Deployment")]
        other_services = [s["metadata"]["labels"] for s in of_kind(other, "Service")]
        selectors = [s["spec"]["selector"] for s in of_kind(docs, "Service")]
        selectors += [d["spec"]["selector"]["matchLabels"] for d in of_kind(docs, "Deployment")]
        selectors += [
            p["spec"]["selector"]["matchLabels"] for p in of_kind(docs, "PodDisruptionBudget")
        ]
        selectors += [
            n["spec"]["podSelector"]["matchLabels"] for n in of_kind(docs, "NetworkPolicy")
        ]
        for selector in selectors:
            assert not any(selects(selector, p) for p in other_pods), selector
        (monitor,) = of_kind(docs, "ServiceMonitor")
        assert not any(
            selects(monitor["spec"]["selector"]["matchLabels"], s) for s in other_services
        )
        # Each release's pods read their own release's Secret.
        release = docs[0]["metadata"]["labels"]["app.kubernetes.io/instance"]
        assert {name for name, _ in secret_refs(docs)} == {
            f"{release}-warden",
            f"{release}-warden-migrate",
        }


def test_probes_ports_and_binds_agree() -> None:
    docs = render()
    config = one(docs, "ConfigMap", "one-warden-config")["data"]
    assert config["PS_HTTP_BIND"].rsplit(":", 1)[1] == "8080"
    assert config["PS_HTTP_METRICS_BIND"].rsplit(":", 1)[1] == "8081"
    grace_needed = float(config["PS_SHUTDOWN_DELAY_SECONDS"]) + float(
        config["PS_SHUTDOWN_TIMEOUT_SECONDS"]
    )
    for d in of_kind(docs, "Deployment"):
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert ports[c[probe]["httpGet"]["port"]] == 8081
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace_needed
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/data" in mounts and config["PS_HOMESERVER_SIGNING_KEY_PATH"] == "/data/signing.key"
        if c["name"] == "gateway":
            assert ports["http"] == 8080
            assert ports["admin"] == int(env_of(c)["PS_ADMIN_HTTP_BIND"]["value"].rsplit(":", 1)[1])
        else:
            assert set(ports) == {"metrics"}
    v6 = one(render({"listenAddress": "::"}), "ConfigMap", "one-warden-config")["data"]
    assert v6["PS_HTTP_BIND"] == "[::]:8080"


def test_pods_are_sized_for_one_process_and_scale_before_a_core() -> None:
    docs = render()
    for d in of_kind(docs, "Deployment"):
        resources = container(d)["resources"]
        assert "cpu" not in resources.get("limits", {})  # no throttled event loops
        cpu_m = int(resources["requests"]["cpu"].rstrip("m"))
        assert cpu_m <= 1000
        for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
            if hpa["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]:
                (metric,) = hpa["spec"]["metrics"]
                target = metric["resource"]["target"]["averageUtilization"]
                # The scale-out point must be below the one core a process can use.
                assert cpu_m * target / 100 < 1000
    assert (
        container(one(docs, "Deployment", "one-warden-gateway"))["resources"]["requests"]["cpu"]
        == "500m"
    )


def test_defaults_render_no_secret_and_read_the_existing_one() -> None:
    docs = render()
    assert of_kind(docs, "Secret") == []
    assert {name for name, _ in secret_refs(docs)} == {"one-warden-secrets"}
    gateway = env_of(container(one(docs, "Deployment", "one-warden-gateway")))
    assert "optional" not in gateway["PS_DATABASE"]["valueFrom"]["secretKeyRef"]
    assert gateway["PS_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    worker = env_of(container(one(docs, "Deployment", "one-warden-filter-worker")))
    assert worker["PS_OPENAI_FILTER_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "one-warden-secrets",
        "key": "openai-filter-api-key",
        "optional": True,
    }
    for d in of_kind(docs, "Deployment"):
        name = container(d)["name"]
        assert ("PS_OPENAI_FILTER_API_KEY" in env_of(container(d))) == (name == "filter-worker")
    # Redis and NATS URLs come from the ConfigMap unless the Secret has them.
    assert gateway["PS_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "one-warden-secrets",
        "key": "redis-url",
        "optional": True,
    }
    # A release named "warden" reads the Secret deploy/k8s documents.
    assert {name for name, _ in secret_refs(render(release="warden"))} == {"warden-secrets"}
    keys = secret_refs(docs)
    assert {
        ("one-warden-secrets", "signing.key"),
        ("one-warden-secrets", "event_signing.key"),
    } <= keys


def test_existing_secret_references_are_used_as_given() -> None:
    docs = render(ci_values("existing-secrets"))
    assert of_kind(docs, "Secret") == []
    assert secret_refs(docs) == {
        ("warden-db", "url"),
        ("warden-db-owner", "url"),
        ("one-keys", "federation"),
        ("one-keys", "policy"),
        ("warden-admin", "key"),
        ("warden-moderator", "tokens"),
        ("warden-redis", "url"),
        ("warden-nats", "url"),
    }
    for d in of_kind(docs, "Deployment"):
        env = env_of(container(d))
        name = container(d)["name"]
        assert ("PS_API_KEY" in env) == (name == "gateway")
        assert ("PS_MODERATOR_ACCESS_TOKENS" in env) == (name == "moderator")
        assert env["PS_NATS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "warden-nats",
            "key": "url",
        }
        assert env["PS_DATABASE"]["valueFrom"]["secretKeyRef"]["name"] == "warden-db"
    (job,) = of_kind(docs, "Job")
    assert env_of(job["spec"]["template"]["spec"]["containers"][0])["PS_DATABASE"]["valueFrom"] == {
        "secretKeyRef": {"name": "warden-db-owner", "key": "url"}
    }


def test_credentials_given_as_values_are_kept_in_the_releases_secret() -> None:
    values = ci_values("inline")
    docs = render(values)
    secret = one(docs, "Secret", "one-warden")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    creds = values["credentials"]
    assert data == {
        "database": creds["database"]["value"],
        "signing.key": creds["signingKey"]["value"],
        "event_signing.key": creds["eventSigningKey"]["value"],
        "api-key": creds["apiKey"]["value"],
    }
    assert "helm.sh/hook" not in secret["metadata"].get("annotations", {})
    # The hook runs before the release's Secret exists: it gets one of its own.
    hook_secret = one(docs, "Secret", "one-warden-migrate")
    assert "pre-install" in hook_secret["metadata"]["annotations"]["helm.sh/hook"]
    assert base64.b64decode(hook_secret["data"]["database"]).decode() == creds["database"]["value"]
    (job,) = of_kind(docs, "Job")
    assert secret_refs([job]) == {("one-warden-migrate", "database")}
    # A changed credential rolls the pods.
    before = one(docs, "Deployment", "one-warden-gateway")["spec"]["template"]["metadata"][
        "annotations"
    ]
    values["credentials"]["apiKey"] = {"value": "another-key"}
    after = one(render(values), "Deployment", "one-warden-gateway")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert before["checksum/credentials"] != after["checksum/credentials"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"credentials": {"existingSecret": ""}}, "credentials.database is required"),
        (
            {
                "credentials": {"existingSecret": "", "database": {"value": "postgres://x"}},
                "keyGeneration": {"enabled": False},
            },
            "credentials.signingKey is required",
        ),
        ({"keyGeneration": {"enabled": "yes"}}, "keyGeneration/enabled"),
        ({"credentials": {"apiKey": {"value": "k", "secret": "s", "secretKey": "k"}}}, "apiKey"),
        ({"credentials": {"database": {"secret": "s"}}}, "database"),
        ({"gatewy": {"replicas": 2}}, "gatewy"),
        ({"admin": {"port": 8081}}, "admin/port"),
        ({"config": {"LOG_LEVEL": "DEBUG"}}, "LOG_LEVEL"),
        ({"httpRoute": {"enabled": True}}, "parentRefs"),
    ],
)
def test_bad_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)


def test_a_service_monitor_only_when_the_crd_exists_and_no_double_scrape() -> None:
    plain = render()
    assert of_kind(plain, "ServiceMonitor") == []
    for d in of_kind(plain, "Deployment"):
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "8081"
    with_crd = render(api_versions=MONITORING)
    (monitor,) = of_kind(with_crd, "ServiceMonitor")
    (metrics,) = [
        s
        for s in of_kind(with_crd, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [
        p["name"] for p in metrics["spec"]["ports"]
    ]
    assert {d["metadata"]["name"] for d in of_kind(with_crd, "Deployment")} == {
        d["metadata"]["name"]
        for d in of_kind(with_crd, "Deployment")
        if selects(metrics["spec"]["selector"], pod_labels(d))
    }
    for d in of_kind(with_crd, "Deployment"):
        assert "prometheus.io/scrape" not in d["spec"]["template"]["metadata"]["annotations"]
    for docs in (plain, with_crd):
        for s in of_kind(docs, "Service"):
            assert not any(
                k.startswith("prometheus.io/") for k in s["metadata"].get("annotations", {})
            )
    assert (
        of_kind(
            render({"monitoring": {"serviceMonitor": {"enabled": False}}}, api_versions=MONITORING),
            "ServiceMonitor",
        )
        == []
    )


def test_federation_is_routed_to_the_gateway_and_the_admin_api_is_not() -> None:
    assert of_kind(render(), "Ingress") == [] and of_kind(render(), "HTTPRoute") == []
    docs = render(ci_values("inline"))
    (ingress,) = of_kind(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "policy.example.org"
    gateway_svc = one(docs, "Service", "one-warden-gateway")
    ports = {p["name"]: p["port"] for p in gateway_svc["spec"]["ports"]}
    assert ports == {"http": 8080}
    paths = {p["path"]: p["backend"]["service"] for p in rule["http"]["paths"]}
    assert set(paths) == {"/_matrix", "/.well-known/matrix"}
    assert all(
        b == {"name": "one-warden-gateway", "port": {"name": "http"}} for b in paths.values()
    )
    admin = one(docs, "Service", "one-warden-admin")
    assert admin["spec"]["type"] == "ClusterIP" and [p["port"] for p in admin["spec"]["ports"]] == [
        8082
    ]
    route_values, _ = SCENARIOS["http-route-ipv6"]
    (route,) = of_kind(render(route_values), "HTTPRoute")
    assert route["spec"]["hostnames"] == ["policy.example.org"]
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"name": "one-warden-gateway", "port": 8080}
    ]
    without_admin = render({"admin": {"enabled": False}})
    assert not [
        s for s in of_kind(without_admin, "Service") if s["metadata"]["name"].endswith("-admin")
    ]
    assert "PS_ADMIN_HTTP_BIND" not in env_of(
        container(one(without_admin, "Deployment", "one-warden-gateway"))
    )


def test_the_migration_hook_and_migrate_on_start() -> None:
    docs = render()
    (job,) = of_kind(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["migrate"]
    # Hooks run before the release's ConfigMap exists.
    assert "envFrom" not in c
    assert one(docs, "ConfigMap", "one-warden-config")["data"]["PS_MIGRATE_ON_START"] == "false"
    off = render({"migrations": {"hook": {"enabled": False}}})
    assert of_kind(off, "Job") == []
    assert "PS_MIGRATE_ON_START" not in one(off, "ConfigMap", "one-warden-config")["data"]


def test_every_variable_the_chart_sets_is_a_warden_setting() -> None:
    fields = {ENV_PREFIX.upper() + name.upper() for name in Settings.model_fields}
    docs = render(ci_values("existing-secrets"))
    names = set(one(docs, "ConfigMap", "one-warden-config")["data"])
    for d in [*of_kind(docs, "Deployment"), *of_kind(docs, "Job")]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            names |= set(env_of(c))
    assert names - fields == set()
    assert {
        "PS_DATABASE",
        "PS_API_KEY",
        "PS_MODERATOR_ACCESS_TOKENS",
        "PS_ADMIN_HTTP_BIND",
    } <= names


def test_network_policies() -> None:
    docs = render()
    gateway_np = one(docs, "NetworkPolicy", "one-warden-gateway")["spec"]
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in gateway_np["ingress"]}
    assert by_port[8080] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    assert by_port[8082] == [
        {"podSelector": {"matchLabels": {"warden.matrix.org/admin-client": "true"}}}
    ]
    common = one(docs, "NetworkPolicy", "one-warden")["spec"]
    assert set(common["policyTypes"]) == {"Ingress", "Egress"}
    assert [r["ports"][0]["port"] for r in common["ingress"]] == [8081]
    egress_ports = {p["port"] for rule in common["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 5432, 6379, 4222, 443, 8448}
    # Every Warden pod is under the common policy; only the gateway opens 8080 and 8082.
    for d in of_kind(docs, "Deployment"):
        assert selects(common["podSelector"]["matchLabels"], pod_labels(d))
        assert selects(gateway_np["podSelector"]["matchLabels"], pod_labels(d)) == (
            container(d)["name"] == "gateway"
        )
    assert of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []
    assert not [
        n for n in of_kind(docs, "NetworkPolicy") if n["metadata"]["name"].endswith("-dependencies")
    ]


def test_a_policy_can_keep_other_clients_off_nats_redis_and_postgres() -> None:
    docs = render({"networkPolicy": {"dependencies": {"enabled": True}}})
    deps = one(docs, "NetworkPolicy", "one-warden-dependencies")["spec"]
    (expression,) = deps["podSelector"]["matchExpressions"]
    assert expression["values"] == ["nats", "redis", "postgresql"]
    (rule,) = deps["ingress"]
    (peer,) = rule["from"]
    warden_pods = [pod_labels(d) for d in of_kind(docs, "Deployment")]
    assert all(selects(peer["podSelector"]["matchLabels"], p) for p in warden_pods)
    other_release = [pod_labels(d) for d in of_kind(render(release="two"), "Deployment")]
    assert not any(selects(peer["podSelector"]["matchLabels"], p) for p in other_release)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_per_service_scheduling_values() -> None:
    values = {
        "priorityClassName": "warden-default",
        "gateway": {
            "priorityClassName": "warden-critical",
            "nodeSelector": {"pool": "edge"},
            "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "DoNotSchedule",
                }
            ],
        },
        "webhooks": {"enabled": False},
    }
    docs = render(values)
    names = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert names == {"one-warden-gateway", "one-warden-filter-worker", "one-warden-moderator"}
    pod = one(docs, "Deployment", "one-warden-gateway")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "warden-critical"
    assert pod["nodeSelector"] == {"pool": "edge"}
    assert pod["tolerations"][0]["key"] == "edge"
    (tsc,) = pod["topologySpreadConstraints"]
    assert tsc["whenUnsatisfiable"] == "DoNotSchedule"
    worker = one(docs, "Deployment", "one-warden-filter-worker")["spec"]["template"]["spec"]
    assert worker["priorityClassName"] == "warden-default"
    assert "nodeSelector" not in worker


HOOK_KINDS = {"ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "Job"}


def keygen_objects(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["metadata"]["name"].endswith("-keygen")]


def hook_weight(doc: Doc) -> int:
    return int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])


def test_without_keys_a_hook_generates_them_once_into_a_secret_helm_never_owns() -> None:
    docs = render(ci_values("generated-keys"))
    hook = keygen_objects(docs)
    assert {d["kind"] for d in hook} == HOOK_KINDS
    for d in hook:
        annotations = d["metadata"]["annotations"]
        assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    (job,) = [d for d in hook if d["kind"] == "Job"]
    migrate = one(docs, "Job", "one-warden-migrate")
    # RBAC and the network path first, then the keys, then the migration.
    assert all(hook_weight(d) < hook_weight(job) for d in hook if d is not job)
    assert hook_weight(job) < hook_weight(migrate)
    # The Job's pod is the only one with an API token, as its own service account.
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert (
        pod["serviceAccountName"]
        == one(docs, "ServiceAccount", "one-warden-keygen")["metadata"]["name"]
    )
    for d in [*of_kind(docs, "Deployment"), migrate]:
        assert d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    # Its command is one the CLI takes, naming the Secret the pods mount.
    (c,) = pod["containers"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "keygen" and args.kubernetes_secret == "one-warden-keys"
    assert not (args.rotate or args.federation_key or args.policy_key)
    labels = dict(item.split("=", 1) for item in args.label)
    assert labels == {"app.kubernetes.io/name": "warden", "app.kubernetes.io/instance": "one"}
    refs = secret_refs(of_kind(docs, "Deployment"))
    assert {("one-warden-keys", "signing.key"), ("one-warden-keys", "event_signing.key")} <= refs
    # Helm renders no such Secret: an upgrade, rollback or uninstall cannot overwrite or
    # delete it; the Job creates it only when it is missing.
    assert not [d for d in docs if d["kind"] == "Secret"]
    # The service account may read only that Secret, create Secrets, and nothing else.
    role = one(docs, "Role", "one-warden-keygen")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["one-warden-keys"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    binding = one(docs, "RoleBinding", "one-warden-keygen")
    assert binding["roleRef"]["name"] == "one-warden-keygen"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "one-warden-keygen", "namespace": "warden"}
    ]
    # With NetworkPolicies on, the Job may reach the API server.
    policy = one(docs, "NetworkPolicy", "one-warden-keygen")["spec"]
    assert selects(
        policy["podSelector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"]
    )
    assert [p["port"] for p in policy["egress"][0]["ports"]] == [443, 6443]
    off = render({**ci_values("generated-keys"), "networkPolicy": {"enabled": False}})
    assert {d["kind"] for d in keygen_objects(off)} == HOOK_KINDS - {"NetworkPolicy"}


def test_keys_given_or_in_the_existing_secret_are_never_generated() -> None:
    assert keygen_objects(render()) == []  # read from credentials.existingSecret
    assert keygen_objects(render(ci_values("existing-secrets"))) == []
    assert keygen_objects(render(ci_values("inline"))) == []
    # true: generated even with an existingSecret, for the keys not given explicitly.
    docs = render(
        {
            "keyGeneration": {"enabled": True},
            "credentials": {"signingKey": {"secret": "mine", "secretKey": "fed"}},
        }
    )
    assert {d["kind"] for d in keygen_objects(docs)} == HOOK_KINDS
    refs = secret_refs(of_kind(docs, "Deployment"))
    assert ("mine", "fed") in refs and ("one-warden-keys", "event_signing.key") in refs
    assert ("one-warden-secrets", "database") in refs
    given = render({"keyGeneration": {"enabled": True}, **ci_values("existing-secrets")})
    assert keygen_objects(given) == []

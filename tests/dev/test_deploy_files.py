"""Static checks of the deployment files (no Docker or cluster here): they parse, and
the references between them (ports, probes, names, key paths, timings) agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from warden.settings import parse_bind

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SECRET_EXAMPLE = K8S / "examples" / "secret.example.yaml"
MIGRATE = K8S / "migrate"
SERVICES = ("gateway", "filter-worker", "moderator", "webhooks")


def load_k8s() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    # The Secret the manifests read is the operator's; its example documents the keys.
    # The migrations Job is a kustomization of its own (a Job is immutable).
    for path in (SECRET_EXAMPLE, MIGRATE / "job.yaml"):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return load_k8s()


@pytest.fixture(scope="module")
def config(k8s: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = find(k8s, "ConfigMap", "warden-config")["data"]
    return data


def test_every_k8s_file_parses_and_is_listed_in_the_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for name in files:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc)
            assert "namespace" not in doc["metadata"]  # namespace-agnostic


def test_an_apply_never_overwrites_the_secret() -> None:
    """Operations review gap 2: `kubectl apply -k deploy/k8s` replaced a real
    `warden-secrets` (database URL, API key, both signing keys) with placeholders."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert doc["kind"] != "Secret", name
    assert "secretGenerator" not in kustomization
    (example,) = yaml.safe_load_all(SECRET_EXAMPLE.read_text())
    assert example["metadata"]["name"] == "warden-secrets"


def test_config_names_real_settings(config: dict[str, str]) -> None:
    from warden.settings import Settings

    fields = {f"PS_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= fields
    # Valid values, as a service would read them.
    Settings(**{k.removeprefix("PS_").lower(): v for k, v in config.items()})


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_probes_ports_and_shutdown(
    k8s: list[dict[str, Any]], config: dict[str, str], service: str
) -> None:
    deployment = find(k8s, "Deployment", f"warden-{service}")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == service
    (container,) = pod["containers"]
    assert container["args"] == [service]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Probes: /livez and /readyz on the port PS_HTTP_METRICS_BIND names.
    metrics_port = parse_bind(config["PS_HTTP_METRICS_BIND"])[1]
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports[get["port"]] == metrics_port
    if service == "gateway":
        assert ports["http"] == parse_bind(config["PS_HTTP_BIND"])[1]
    else:
        assert "http" not in ports

    # The service flips readiness itself on SIGTERM: no preStop, and enough grace time.
    assert "lifecycle" not in container
    budget = float(config["PS_SHUTDOWN_DELAY_SECONDS"]) + float(
        config["PS_SHUTDOWN_TIMEOUT_SECONDS"]
    )
    assert pod["terminationGracePeriodSeconds"] > budget

    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True

    # Settings and secrets.
    assert {"configMapRef": {"name": "warden-config"}} in container["envFrom"]
    database = next(e for e in container["env"] if e["name"] == "PS_DATABASE")
    assert database["valueFrom"]["secretKeyRef"] == {"name": "warden-secrets", "key": "database"}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "keys")
    volume = next(v for v in pod["volumes"] if v["name"] == "keys")
    assert volume["secret"]["secretName"] == "warden-secrets"
    mounted = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    assert mounted == {
        config["PS_HOMESERVER_SIGNING_KEY_PATH"],
        config["PS_HOMESERVER_EVENT_SIGNING_KEY_PATH"],
    }
    secret = find(k8s, "Secret", "warden-secrets")
    assert {item["key"] for item in volume["secret"]["items"]} | {"database", "api-key"} == set(
        secret["stringData"]
    )


def test_services_pdbs_and_autoscalers(k8s: list[dict[str, Any]]) -> None:
    gateway = find(k8s, "Service", "warden-gateway")
    (port,) = gateway["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (8080, "http")
    assert gateway["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"

    metrics = find(k8s, "Service", "warden-metrics")
    assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"
    # It selects every component's pods (only the shared label).
    assert metrics["spec"]["selector"] == {"app.kubernetes.io/name": "warden"}

    for service in ("gateway", "filter-worker"):
        deployment = find(k8s, "Deployment", f"warden-{service}")
        selector = deployment["spec"]["selector"]["matchLabels"]
        pdb = find(k8s, "PodDisruptionBudget", f"warden-{service}")
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        hpa = find(k8s, "HorizontalPodAutoscaler", f"warden-{service}")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"warden-{service}",
        }
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
        assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_migration_job(k8s: list[dict[str, Any]]) -> None:
    job = find(k8s, "Job", "warden-migrate")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    # Operations review gap 4: a fixed-name Job in the main kustomization made every
    # later `kubectl apply -k deploy/k8s` with a new image fail (immutable template).
    main = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not any("job" in name for name in main["resources"])
    own = yaml.safe_load((MIGRATE / "kustomization.yaml").read_text())
    assert own["resources"] == ["job.yaml"]
    assert own["images"] == main["images"]  # the same image as the services


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "nats", "init", *SERVICES}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "-js" in services["nats"]["command"]
    init = services["init"]
    assert "warden migrate" in " ".join(init["entrypoint"])
    assert "warden keygen" in " ".join(init["entrypoint"])
    assert init["build"] == "."
    env = init["environment"]
    key_dir = {str(Path(env["PS_HOMESERVER_SIGNING_KEY_PATH"]).parent)}
    assert any(v.split(":")[1] in key_dir for v in init["volumes"])
    for name in SERVICES:
        service = services[name]
        assert service["command"] == [name]
        assert service["depends_on"]["init"] == {"condition": "service_completed_successfully"}
        test = " ".join(service["healthcheck"]["test"])
        port = parse_bind(service["environment"]["PS_HTTP_METRICS_BIND"])[1]
        assert f"http://127.0.0.1:{port}/readyz" in test
        (keys,) = service["volumes"]
        assert keys.endswith(":ro")
        assert keys.split(":")[0] in compose["volumes"]
        assert keys.split(":")[1] in key_dir
        for dependency in service["depends_on"]:
            assert dependency in services
    assert services["gateway"]["ports"] == ["8080:8080"]
    assert "ports" not in services["filter-worker"]


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages
    assert all(image == "python:3.11-slim" for image in stages)
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user
    assert user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["warden"\]$', text, re.MULTILINE)
    # Every path the build copies exists.
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for part in source.split():
            assert (ROOT / part).exists(), part


def test_the_admin_api_key_comes_from_a_secret(k8s: list[dict[str, Any]]) -> None:
    # Kubernetes: the gateway reads PS_API_KEY from the Secret, optional (API off without).
    (container,) = find(k8s, "Deployment", "warden-gateway")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    ref = env["PS_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "warden-secrets"
    assert ref["optional"] is True
    secret = find(k8s, "Secret", "warden-secrets")
    assert ref["key"] in secret["stringData"]
    # Compose: passed through from the environment, empty (off) by default.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["gateway"]["environment"]["PS_API_KEY"] == "${PS_API_KEY:-}"


def test_network_policies_open_only_federation_to_everyone(k8s: list[dict[str, Any]]) -> None:
    """M10: only Warden's pods reach NATS and Redis; only port 8080 is open to all."""
    ingress = find(k8s, "NetworkPolicy", "warden-ingress")["spec"]
    assert ingress["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "warden"}
    open_to_all = [r for r in ingress["ingress"] if not r.get("from")]
    assert [p["port"] for r in open_to_all for p in r["ports"]] == [8080]
    gateway = find(k8s, "Deployment", "warden-gateway")
    ports = {
        p["name"]: p["containerPort"]
        for c in gateway["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    assert ports["http"] == 8080
    covered = {p["port"] for r in ingress["ingress"] for p in r["ports"]}
    assert set(ports.values()) <= covered, "a gateway port the policy forgets is closed"
    bus = find(k8s, "NetworkPolicy", "warden-bus-and-cache")["spec"]
    (rule,) = bus["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "warden"}}}]


def test_the_admin_api_has_its_own_port_outside_the_public_service(
    k8s: list[dict[str, Any]],
) -> None:
    # Review M11: PS_ADMIN_HTTP_BIND names a container port that no Service exposes.
    (container,) = find(k8s, "Deployment", "warden-gateway")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == parse_bind(env["PS_ADMIN_HTTP_BIND"]["value"])[1]
    for service in (d for d in k8s if d["kind"] == "Service"):
        exposed = {p.get("targetPort") for p in service["spec"]["ports"]}
        assert "admin" not in exposed and ports["admin"] not in exposed


def test_every_pod_is_scraped_once(k8s: list[dict[str, Any]]) -> None:
    """Operations review gap 7: annotations on the pods and on the metrics Service made
    the usual pod and service-endpoints scrape jobs scrape every pod twice."""
    for service in SERVICES:
        pod = find(k8s, "Deployment", f"warden-{service}")["spec"]["template"]["metadata"]
        assert pod["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["annotations"]["prometheus.io/port"] == "8081"
    for svc in (d for d in k8s if d["kind"] == "Service"):
        annotations = svc["metadata"].get("annotations", {})
        assert not any(k.startswith("prometheus.io/") for k in annotations), svc["metadata"]
    # The Prometheus Operator's way, as an example outside the kustomization.
    (monitor,) = yaml.safe_load_all((K8S / "examples" / "service-monitor.yaml").read_text())
    metrics = find(k8s, "Service", "warden-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    matched = [
        d
        for d in k8s
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    assert matched == [metrics]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [
        p["name"] for p in metrics["spec"]["ports"]
    ]


def test_passwords_and_tokens_come_from_the_secret(k8s: list[dict[str, Any]]) -> None:
    """Operations review gap 11: Redis and NATS URLs with passwords had no place but the
    ConfigMap, and the moderator's access tokens were not wired."""
    for service in SERVICES:
        (container,) = find(k8s, "Deployment", f"warden-{service}")["spec"]["template"]["spec"][
            "containers"
        ]
        env = {e["name"]: e for e in container.get("env", [])}
        for name, key in (("PS_REDIS_URL", "redis-url"), ("PS_NATS_URL", "nats-url")):
            # env wins over envFrom: the Secret's URL, when it has one, over the ConfigMap's.
            assert env[name]["valueFrom"]["secretKeyRef"] == {
                "name": "warden-secrets",
                "key": key,
                "optional": True,
            }
        tokens = env.get("PS_MODERATOR_ACCESS_TOKENS")
        if service == "moderator":
            assert tokens is not None
            assert tokens["valueFrom"]["secretKeyRef"] == {
                "name": "warden-secrets",
                "key": "moderator-access-tokens",
                "optional": True,
            }
        else:
            assert tokens is None
    example = SECRET_EXAMPLE.read_text()
    for key in ("redis-url", "nats-url", "moderator-access-tokens"):
        assert f"`{key}`" in example


def test_replicas_spread_over_zones_and_nodes(k8s: list[dict[str, Any]]) -> None:
    """Operations review gap 13: two gateways could land on one node or zone."""
    for service in ("gateway", "filter-worker"):
        deployment = find(k8s, "Deployment", f"warden-{service}")
        pod = deployment["spec"]["template"]
        constraints = pod["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        for c in constraints:
            assert (
                c["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
            )
            assert c["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            assert c["matchLabelKeys"] == ["pod-template-hash"]


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_every_manifest_validates_strictly(k8s: list[dict[str, Any]], version: str) -> None:
    import kubernetes_validate

    for doc in k8s:
        kubernetes_validate.validate(doc, version, strict=True)

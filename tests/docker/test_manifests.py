"""docker/compose.yaml against the compose specification, docker/k8s/ against the Kubernetes schemas (offline),
and both against the Dockerfile and the server: the same port, user, probes, settings and drain time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config import Settings
from server.metrics import Metrics
from tests.docker import dockerfile
from tests.docker.dockerfile import ROOT, named

COMPOSE = ROOT / "docker" / "compose.yaml"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
K8S = ROOT / "docker" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# The oldest Kubernetes release kubernetes-validate still ships schemas for, and its newest.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
SETTINGS = {f"WINDOWLM_{name.upper()}" for name in Settings.model_fields}
DRAIN_TIMEOUT = Settings.model_fields["drain_timeout"].default
INSTRUCTIONS = dockerfile.read()


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def resources(kind: str, folder: Path = K8S) -> list[dict]:
    found = []
    for path in sorted(folder.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == kind]
    return found


def seconds(duration: str) -> float:
    """Compose durations: 1m30s, 45s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# --- docker compose ---------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_catches_a_mistake(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    result = check_compose_schema(broken)
    assert result.returncode != 0 and "stop_grace_periods" in result.stdout


def test_compose_reserves_a_gpu_mounts_weights_read_only_and_outlasts_the_drain() -> None:
    server = compose()["services"]["windowlm"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    (weights,) = [v for v in server["volumes"] if v["target"] == "/weights"]
    assert weights["read_only"] is True
    environment = server["environment"]
    assert environment.keys() <= SETTINGS, environment.keys() - SETTINGS
    assert environment["WINDOWLM_WEIGHTS"] == "/weights"
    drain = float(environment.get("WINDOWLM_DRAIN_TIMEOUT", DRAIN_TIMEOUT))
    assert seconds(server["stop_grace_period"]) > drain
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert any(port.endswith(":8000") for port in server["ports"])
    assert "/health" in " ".join(server["healthcheck"]["test"])


def test_prometheus_is_optional_and_scrapes_the_servers_metrics() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert "profiles" not in services["windowlm"], "the server must start without a profile"
    mounted = {Path(v["source"]).name for v in prometheus["volumes"]}
    assert PROMETHEUS.name in mounted
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["windowlm:8000"]


# --- Kubernetes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.relative_to(K8S).as_posix() for p in MANIFESTS])
def test_kubernetes_manifest_validates(path: Path, version: str) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_kubernetes_validation_catches_a_mistake() -> None:
    (deployment,) = resources("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def pod() -> dict:
    (deployment,) = resources("Deployment")
    return deployment["spec"]["template"]


def container() -> dict:
    (only,) = pod()["spec"]["containers"]
    return only


def container_env() -> dict[str, object]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container()["env"]}


def test_deployment_probes_fit_the_servers_endpoints() -> None:
    spec = container()
    assert spec["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = spec["startupProbe"]
    assert startup["httpGet"]["path"] in ("/ready", "/health")
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "give the weights minutes to load"
    ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[spec[probe]["httpGet"]["port"]] == 8000
    exposed = {w.split("/")[0] for e in named(INSTRUCTIONS, "EXPOSE") for w in e.args.split()}
    assert str(ports["http"]) in exposed


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    pre_stop = container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pause = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        pause = float(command[1])
    assert pause > 0
    drain = float(container_env().get("WINDOWLM_DRAIN_TIMEOUT", DRAIN_TIMEOUT))
    assert pod()["spec"]["terminationGracePeriodSeconds"] > pause + drain


def test_deployment_asks_for_one_gpu_and_runs_as_the_images_user() -> None:
    spec = container()
    assert int(spec["resources"]["limits"]["nvidia.com/gpu"]) == 1
    security = pod()["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    image_user = named(INSTRUCTIONS, "USER")[-1].args.split(":")[0]
    assert str(security["runAsUser"]) == image_user
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False


def test_deployment_settings_are_windowlm_settings_and_no_service_links_leak_in() -> None:
    assert container_env().keys() <= SETTINGS, container_env().keys() - SETTINGS
    # A Service named windowlm would inject WINDOWLM_PORT=tcp://... into every pod: the server's own variable.
    assert pod()["spec"]["enableServiceLinks"] is False


def test_service_selects_the_pods_on_the_http_port() -> None:
    (service,) = resources("Service")
    labels = pod()["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container()["ports"]}


def test_autoscaler_scales_the_deployment_on_waiting_requests() -> None:
    (deployment,) = resources("Deployment")
    (hpa,) = resources("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    exported = {family.name for family in Metrics().registry.collect()}
    assert name == "windowlm_requests_waiting" and name in exported


def test_cpu_fallback_autoscaler_replaces_the_same_one() -> None:
    (hpa,) = resources("HorizontalPodAutoscaler")
    (fallback,) = resources("HorizontalPodAutoscaler", K8S / "fallback")
    assert fallback["metadata"]["name"] == hpa["metadata"]["name"]
    assert fallback["spec"]["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
    (metric,) = fallback["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"


def test_the_deployment_sizes_torchs_threads_to_the_cpus_the_pod_asks_for() -> None:
    """Without a CPU limit a container sees every core of its node; the server would start that many threads."""
    source = container_env()["WINDOWLM_THREADS"]["resourceFieldRef"]
    assert source["resource"] == "requests.cpu" and source["containerName"] == container()["name"]
    assert source["divisor"] == "1" and "cpu" in container()["resources"]["requests"]

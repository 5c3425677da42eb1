"""The Kubernetes base (deploy/kubernetes) renders, validates against the Kubernetes schemas, and agrees with pgmux.

Rendering is `kubectl kustomize deploy/kubernetes` when kubectl is on PATH. Without it, ``deploy_files.load_base``
stands in for it: the base is plain resources (no generators, transformers or patches, which the loader refuses), and
kustomize renders such a base as the objects of its `resources` files, unchanged. Where kubectl exists a test checks
that the two give the same objects. No cluster is involved either way.

What pgmux runs with in a pod is computed with pgmux's own settings loader from the ConfigMap's pgmux.toml and the
environment the pod gets: the image's ENV (Dockerfile), overridden by the Secret (envFrom), overridden by the
container's env, as Kubernetes and Docker layer them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from deploy_files import (container, container_port, final_stage, kubectl_kustomize, load_base, pgmux_toml,
                          pod_environment, pod_spec, rendered, the)

from proxy.metrics import MetricsServer
from proxy.settings import Settings, load_settings, split_address

ROOT = Path(__file__).resolve().parents[2]
KINDS = {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
         "ServiceMonitor"}
# The README's worked example: PostgreSQL's default max_connections (100), less its default
# superuser_reserved_connections (3), less 10 for migrations, monitoring and admin sessions.
EXAMPLE_DATABASE_BUDGET = 100 - 3 - 10


@pytest.fixture
def pod_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings pgmux loads in the pod: the ConfigMap's pgmux.toml at the path the container passes --config."""
    args = container()["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in container()["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    assert config_path.name in the("ConfigMap")["data"]
    (tmp_path / config_path.name).write_text(pgmux_toml())
    for key in list(os.environ):
        if key.startswith("PGMUX_"):
            monkeypatch.delenv(key)
    for key, value in pod_environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return load_settings(tmp_path / config_path.name, [])


def seconds(duration: str) -> float:
    """A Prometheus Operator duration (30s, 1m, 1m30s) in seconds."""
    assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", duration) and duration, f"{duration!r} is not a duration"
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([hms])", duration))


# ---- rendering and schemas ----------------------------------------------------------------------

def test_base_renders_one_of_each_object_a_fleet_needs() -> None:
    kinds = [obj["kind"] for obj in rendered()]
    assert sorted(kinds) == sorted(KINDS)
    for obj in rendered():
        assert "namespace" not in obj["metadata"], "the namespace is the overlay's or kubectl's to choose"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "pgmux"


def test_fallback_loader_renders_what_kubectl_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the suite renders the base with load_base alone")

    def keyed(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}

    assert keyed(load_base()) == keyed(kubectl_kustomize(kubectl))


def test_every_builtin_object_validates_against_the_kubernetes_schemas() -> None:
    """Strict (unknown fields are errors) against every Kubernetes version kubernetes-validate ships schemas for."""
    versions = sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    assert versions, "kubernetes-validate ships no schemas"
    for obj in rendered():
        if obj["kind"] == "ServiceMonitor":
            continue  # a CustomResourceDefinition's kind: shape checked below
        for version in versions:
            kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The validation above can fail: a probe under a misspelt name is an unknown field in strict mode."""
    deployment = the("Deployment")
    spec = deployment["spec"]["template"]["spec"]["containers"][0]
    spec["readinesProbe"] = spec.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_servicemonitor_scrapes_metrics_from_the_services_metrics_port(pod_settings: Settings) -> None:
    monitor, service = the("ServiceMonitor"), the("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["path"] == "/metrics"
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    service_port = next(port for port in service["spec"]["ports"] if port["name"] == endpoint["port"])
    assert container_port(service_port["targetPort"]) == split_address(pod_settings.metrics_listen or "")[1]


# ---- the pod and pgmux's settings ---------------------------------------------------------------

def test_configmap_pgmux_toml_loads_and_decides_the_addresses(pod_settings: Settings) -> None:
    """pgmux.toml loads with pgmux's loader, and the image's PGMUX_* defaults do not silently override it."""
    toml = tomllib.loads(pgmux_toml())
    for key in ("listen", "metrics_listen", "log_format", "default_pool_size", "max_db_connections",
                "shutdown_timeout", "admin_users"):
        assert key in toml, f"pgmux.toml should say {key}"
    assert pod_settings.listen == toml["listen"]
    assert pod_settings.metrics_listen == toml["metrics_listen"]
    assert pod_settings.log_format == toml["log_format"] == "json"
    assert [user for user in pod_settings.admin_users if user not in pod_settings.users] == [], \
        "every admin user needs a password, from the Secret"
    assert pod_settings.all_databases(), "the Secret's upstream URL is the database"


def test_container_and_service_ports_are_pgmuxs_listeners(pod_settings: Settings) -> None:
    listeners = pod_settings.all_listeners()
    assert [(l.address, l.pool_mode.value) for l in listeners] == [("0.0.0.0:6432", "transaction")]
    listen_port = split_address(listeners[0].address)[1]
    metrics_port = split_address(pod_settings.metrics_listen or "")[1]
    assert container_port("postgres") == listen_port and container_port("metrics") == metrics_port
    exposed = {int(port) for word, rest in final_stage() if word == "EXPOSE" for port in rest.split()}
    assert exposed >= {listen_port, metrics_port}, "the image exposes what the pod listens on"
    services = {port["name"]: port for port in the("Service")["spec"]["ports"]}
    assert services["postgres"]["port"] == 6432 and container_port(services["postgres"]["targetPort"]) == listen_port
    assert container_port(services["metrics"]["targetPort"]) == metrics_port


def test_probes_ask_pgmux_health_paths_on_the_metrics_port(pod_settings: Settings) -> None:
    readiness, liveness = container()["readinessProbe"]["httpGet"], container()["livenessProbe"]["httpGet"]
    assert (readiness["path"], liveness["path"]) == ("/readyz", "/healthz")
    metrics_port = split_address(pod_settings.metrics_listen or "")[1]
    assert container_port(readiness["port"]) == container_port(liveness["port"]) == metrics_port

    class Draining:
        def ready(self) -> tuple[bool, list[str]]:
            return False, ["draining: shutting down"]

    server = MetricsServer(None, None, Draining())  # type: ignore[arg-type]  # the probe paths read readiness only
    assert asyncio.run(server.respond("GET", readiness["path"]))[0] == 503, "/readyz says 503 while draining"
    assert asyncio.run(server.respond("GET", liveness["path"]))[0] == 200, "/healthz answers whatever the state"


def test_grace_period_outlasts_prestop_and_pgmux_drain(pod_settings: Settings) -> None:
    """SIGTERM comes after preStop, and the grace period counts from preStop's start; pgmux then drains for up to
    shutdown_timeout and closes its pools. A rollout step waits out one such drain (minReadySeconds)."""
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    drain = pre_stop + pod_settings.shutdown_timeout
    assert pre_stop >= 5, "endpoint removal needs seconds to reach every kube-proxy"
    assert pod_spec()["terminationGracePeriodSeconds"] >= drain + 5, "no margin to close pools after the drain"
    assert the("Deployment")["spec"]["minReadySeconds"] >= drain


def test_pod_runs_as_the_images_user_with_a_read_only_root() -> None:
    useradd = next(rest for word, rest in final_stage() if word == "RUN" and "useradd" in rest)
    uid = re.search(r"--uid (\d+)", useradd)
    assert uid is not None, "the Dockerfile's useradd names the uid"
    pod_security = pod_spec()["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == int(uid.group(1))
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container()["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "1", "one pgmux process uses one core"


def test_image_and_command_are_the_dockerfiles() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container()["image"] == f"pgmux:{version}"
    cmd = yaml.safe_load(next(rest for word, rest in final_stage() if word == "CMD"))
    assert container()["args"][:len(cmd)] == cmd, "the container's args replace the image's CMD: keep `serve`"


def test_secret_holds_only_marked_placeholders_and_the_configmap_no_secret() -> None:
    secret = the("Secret")
    assert "data" not in secret and secret["stringData"]
    for key, value in secret["stringData"].items():
        assert key.startswith("PGMUX_") and "CHANGE-ME" in value, f"{key} is not a marked placeholder"
    toml = tomllib.loads(pgmux_toml())
    assert not {"upstream_url", "databases", "users"} & set(toml), "credentials belong in the Secret"


# ---- the fleet: replicas, disruptions, autoscaling ----------------------------------------------

def test_service_pdb_and_hpa_select_the_deployments_pods() -> None:
    deployment = the("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert the("Service")["spec"]["selector"].items() <= pod_labels
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels
    target = the("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert the("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2, \
        "with one replica the PDB blocks every node drain, or an eviction takes the only pooler"


def test_fleet_backends_fit_the_readme_example_database(pod_settings: Settings) -> None:
    """Pods that can hold backends at once: the HPA's maximum, the rollout's surge pod, the old pod still draining
    during a rollout step, and one pod evicted under the PDB. Each holds at most max_db_connections (one database)."""
    per_pod = pod_settings.max_db_connections
    assert per_pod and len(pod_settings.all_databases()) == 1, "one database, capped per replica"
    pods = (the("HorizontalPodAutoscaler")["spec"]["maxReplicas"]
            + the("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
            + 1
            + the("PodDisruptionBudget")["spec"]["maxUnavailable"])
    assert pods * per_pod <= EXAMPLE_DATABASE_BUDGET
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running a fleet on Kubernetes"):]
    assert f"{pods} × {per_pod} = {pods * per_pod}" in section, "the README's worked example is the base's numbers"
    assert f"{EXAMPLE_DATABASE_BUDGET}" in section


def test_readme_says_how_to_apply_it_and_where_cancels_fall_short() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running a fleet on Kubernetes"):]
    section = section[:section.index("\n## ", 1)]
    for words in ("kubectl kustomize deploy/kubernetes", "kubectl apply -k", "CancelRequest", "peer_id",
                  "max_connections", "superuser_reserved_connections", "maxReplicas"):
        assert words in section, f"the section does not mention {words}"

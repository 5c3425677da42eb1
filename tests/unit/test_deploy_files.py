"""Dockerfile, docker-compose.yml, Prometheus, Grafana and the example config agree with the code (no Docker needed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_files import dockerfile_env, dockerfile_instructions, final_stage

from proxy.metrics import METRICS, exposition_names
from proxy.settings import Settings, load_settings, split_address

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
DASHBOARD = CONFIG / "grafana" / "dashboards" / "pgmux.json"
# What prometheus-client's ProcessCollector exports on Linux (the dashboard may use these too).
PROCESS_METRICS = {"process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_virtual_memory_bytes",
                   "process_resident_memory_bytes", "process_start_time_seconds"}
EXPORTED = {sample for name in METRICS for sample in exposition_names(name)} | PROCESS_METRICS


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("PGMUX_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT / "tests")  # no pgmux.toml here: the environment alone
    return load_settings(None, [])


def pgmux_service_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What pgmux runs with in the compose stack: the image's ENV, overridden by the service's environment."""
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("PGMUX_")}
    env.update({k: str(v) for k, v in compose()["services"]["pgmux"]["environment"].items()})
    return settings_from_env(env, monkeypatch)


def _setting_names(env_names: list[str]) -> list[str]:
    return [name.removeprefix("PGMUX_").split("__")[0].lower() for name in env_names if name.startswith("PGMUX_")]


# ---- Dockerfile ---------------------------------------------------------------------------------

def test_dockerfile_is_slim_non_root_and_runtime_only() -> None:
    stage = final_stage()
    base = next(rest for word, rest in stage if word == "FROM")
    assert re.match(r"python:\$\{PYTHON_VERSION\}-slim|python:3\.\d+-slim", base), base
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    text = (ROOT / "Dockerfile").read_text()
    assert "[dev]" not in text and "pytest" not in text, "test dependencies do not belong in the image"
    for word, rest in dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


def test_dockerfile_env_names_are_settings_and_ports_are_exposed(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dockerfile_env()
    for name in _setting_names(list(env)):
        assert name in Settings.model_fields, f"Dockerfile sets PGMUX_{name.upper()}, which is no setting"
    settings = settings_from_env({**{k: v for k, v in env.items() if k.startswith("PGMUX_")},
                                  "PGMUX_UPSTREAM_URL": "postgresql://app:pw@db:5432/app"}, monkeypatch)
    listen_port = split_address(settings.all_listeners()[0].address)[1]
    assert settings.metrics_listen is not None, "the image must serve /healthz for its HEALTHCHECK"
    metrics_port = split_address(settings.metrics_listen)[1]
    exposed = {int(port) for word, rest in final_stage() if word == "EXPOSE" for port in rest.split()}
    assert {listen_port, metrics_port} <= exposed
    assert settings.all_listeners()[0].address.startswith("0.0.0.0:"), "in a container, listen on all interfaces"


def test_dockerfile_healthcheck_probes_healthz_on_the_metrics_port() -> None:
    healthcheck = next(rest for word, rest in final_stage() if word == "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2] and "PGMUX_METRICS_LISTEN" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")  # the probe is valid Python


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    entrypoint = json.loads(next(rest for word, rest in final_stage() if word == "ENTRYPOINT"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert entrypoint == ["pgmux"] and 'pgmux = "proxy.cli:main"' in pyproject
    assert json.loads(next(rest for word, rest in final_stage() if word == "CMD")) == ["serve"]


def test_dockerignore_keeps_tests_out_and_the_package_in() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tests", "benchmarks", ".git"} <= ignored
    assert not ignored & {"proxy", "pyproject.toml", "setup.py", "README.md"}


# ---- docker-compose.yml -------------------------------------------------------------------------

def test_compose_has_the_stack() -> None:
    services = compose()["services"]
    assert set(services) >= {"postgres", "pgmux", "prometheus", "grafana"}
    assert services["pgmux"]["build"] == "."
    assert services["pgmux"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_pgmux_has_a_transaction_and_a_session_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    env_names = list(compose()["services"]["pgmux"]["environment"])
    for name in _setting_names(env_names):
        assert name in Settings.model_fields, f"compose sets PGMUX_{name.upper()}, which is no setting"
    settings = pgmux_service_settings(monkeypatch)
    listeners = [(split_address(l.address)[1], l.pool_mode.value) for l in settings.all_listeners()]
    assert listeners == [(6432, "transaction"), (5432, "session")]
    assert settings.admin_users, "the compose stack shows the admin console"
    published = {int(str(mapping).split(":")[-1]) for mapping in compose()["services"]["pgmux"]["ports"]}
    assert published == {6432, 5432, split_address(settings.metrics_listen)[1]}


def test_compose_upstream_matches_the_postgres_service(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.settings import parse_upstream_url

    settings = pgmux_service_settings(monkeypatch)
    upstream = parse_upstream_url(settings.upstream_url.get_secret_value())
    postgres = compose()["services"]["postgres"]["environment"]
    assert (upstream.host, upstream.port) == ("postgres", 5432)
    assert (upstream.user, upstream.password, upstream.database) == \
        (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


def test_compose_mounts_exist_and_prometheus_scrapes_the_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    mounts = {}
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source, target = volume.split(":")[:2]
            assert (ROOT / source).exists(), f"{service} mounts {source}, which does not exist"
            mounts[target] = ROOT / source
    prometheus = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    metrics_port = split_address(pgmux_service_settings(monkeypatch).metrics_listen)[1]
    assert targets == [f"pgmux:{metrics_port}"]
    for rule_file in prometheus["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts, f"compose does not mount {rule_file} beside prometheus.yml"
    provider = yaml.safe_load((CONFIG / "grafana" / "provisioning" / "dashboards" / "pgmux.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == CONFIG / "grafana" / "provisioning"


# ---- Prometheus and Grafana files ---------------------------------------------------------------

def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(?:pgmux|process|python)_[a-z0-9_]+\b", text))


def test_dashboard_datasource_is_the_provisioned_one_and_metrics_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', json.dumps([p["datasource"] for p in dashboard["panels"]])))
    assert uids == {uid}
    used = _metric_names(DASHBOARD.read_text())
    assert used and used <= EXPORTED, sorted(used - EXPORTED)
    assert {"pgmux_client_rejections_total", "pgmux_pool_maxwait_seconds", "pgmux_servers"} <= used


def test_alert_rules_use_existing_metrics() -> None:
    rules = yaml.safe_load((CONFIG / "pgmux-alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = _metric_names(" ".join(exprs))
    assert used <= EXPORTED, sorted(used - EXPORTED)
    assert {"pgmux_client_rejections_total", "pgmux_pool_maxwait_seconds", "pgmux_servers"} <= used


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    result = subprocess.run([promtool, "check", "config", str(CONFIG / "prometheus.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


# ---- the example config and the README ----------------------------------------------------------

def test_example_config_passes_check_config() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGMUX_")}
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--config", str(CONFIG / "pgmux.toml")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert [(l["address"], l["pool_mode"]) for l in effective["listeners"]] == \
        [("0.0.0.0:6432", "transaction"), ("0.0.0.0:5432", "session")]
    assert effective["metrics_listen"] == "0.0.0.0:9127"
    assert "app-secret" not in result.stdout and "change-me" not in result.stdout


def test_readme_documents_metrics_that_exist_and_says_the_image_build_is_untested() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Observability"):]
    used = {name for name in _metric_names(section) if name.startswith("pgmux_")}
    assert used <= EXPORTED | set(METRICS), sorted(used - EXPORTED - set(METRICS))
    assert set(METRICS) <= used, f"README does not list {sorted(set(METRICS) - used)}"
    assert "untested" in readme.lower() and "docker" in readme.lower()

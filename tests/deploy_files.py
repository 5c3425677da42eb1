"""Reading the deployment files as their tools would, for the tests that check them against the code.

The Dockerfile as Docker reads it (instructions, the final stage, its ENV), and the Kubernetes base
(deploy/kubernetes) as `kubectl kustomize` renders it: with kubectl when it is on PATH; without it, ``load_base``
stands in: the base is plain resources (no generators, transformers or patches, which the loader refuses), and
kustomize renders such a base as the objects of its `resources` files, unchanged.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_BASE = ROOT / "deploy" / "kubernetes"


# ---- the Dockerfile -----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """Every (INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env



# ---- the Kubernetes base ------------------------------------------------------------------------

def load_base() -> list[dict[str, Any]]:
    """What `kubectl kustomize` renders for a base of plain resources: each resource file's objects, in order."""
    kustomization = yaml.safe_load((KUBERNETES_BASE / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, \
        "the base uses more than plain resources: this loader would no longer render what kustomize renders"
    objects = []
    for name in kustomization["resources"]:
        objects.extend(obj for obj in yaml.safe_load_all((KUBERNETES_BASE / name).read_text()) if obj is not None)
    return objects


def kubectl_kustomize(kubectl: str) -> list[dict[str, Any]]:
    result = subprocess.run([kubectl, "kustomize", str(KUBERNETES_BASE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj is not None]


@functools.cache
def rendered() -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    return tuple(kubectl_kustomize(kubectl) if kubectl else load_base())


def the(kind: str) -> dict[str, Any]:
    """The one object of ``kind`` in the rendered base (a copy: tests may not change what others read)."""
    matches = [obj for obj in rendered() if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return copy.deepcopy(matches[0])


def pod_spec() -> dict[str, Any]:
    return the("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(name_or_number: str | int) -> int:
    """A port the container declares, by its name (as probes and Services name it) or number."""
    for port in container()["ports"]:
        if name_or_number in (port["name"], port["containerPort"]):
            return int(port["containerPort"])
    raise AssertionError(f"the container declares no port {name_or_number!r}")


def pgmux_toml() -> str:
    return the("ConfigMap")["data"]["pgmux.toml"]


def pod_environment() -> dict[str, str]:
    """PGMUX_* variables in the pod: the image's ENV < the Secret (envFrom) < the container's env."""
    env = {key: value for key, value in dockerfile_env().items() if key.startswith("PGMUX_")}
    secrets = {the("Secret")["metadata"]["name"]: the("Secret")["stringData"]}
    for source in container().get("envFrom", []):
        env.update(secrets[source["secretRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container().get("env", [])})
    return env

"""deploy/kubernetes rendered with `kubectl kustomize`, and what the tests need to read from it: workloads,
their containers, the Secrets kustomize generated, and the config a process would load inside a pod."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")

# Which setting gives each named container port, per `headwater` command the container runs.
PORT_SETTINGS: dict[tuple[str, ...], dict[str, tuple[str, str]]] = {
    ("receiver",): {"http": ("receiver", "port"), "operator": ("receiver", "operator_port")},
    ("worker",): {"web": ("worker", "web_port")},
    ("rewards", "run"): {"web": ("rewards", "web_port")},
}
HOST_SETTINGS = {
    ("receiver", "port"): ("receiver", "host"),
    ("receiver", "operator_port"): ("receiver", "operator_host"),
    ("worker", "web_port"): ("worker", "web_host"),
    ("rewards", "web_port"): ("rewards", "web_host"),
}


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """Every object `kubectl kustomize directory` renders."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/kubernetes"
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(directory) if o["kind"] == kind]


def workloads(directory: Path) -> list[dict[str, Any]]:
    return [o for o in render(directory) if o["kind"] in WORKLOAD_KINDS]


def workload(directory: Path, name: str) -> dict[str, Any]:
    [found] = [w for w in workloads(directory) if w["metadata"]["name"] == name]
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [only] = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def command(workload: dict[str, Any]) -> tuple[str, ...]:
    return tuple(container(workload)["args"])


def secret_files(directory: Path, name: str) -> dict[str, str]:
    """The files of a Secret kustomize generated (by its base name, before the hash suffix)."""
    for secret in objects(directory, "Secret"):
        if secret["metadata"]["name"].rsplit("-", 1)[0] == name:
            return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    raise AssertionError(f"no generated Secret {name}")


def config_doc(directory: Path) -> dict[str, Any]:
    return tomllib.loads(secret_files(directory, "headwater-config")["headwater.toml"])


def probes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: spec[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in spec}


def port_number(spec: dict[str, Any], port: str | int) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in spec["ports"] if p["name"] == port]
    return int(number)


def pod_files(
    directory: Path,
    workload: dict[str, Any],
    root: Path,
    config_text: str,
    external: dict[str, dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Write every Secret the container mounts under `root`, as the kubelet would: generated ones from the
    render (its headwater.toml replaced by `config_text`), `external` ones (made outside the manifests)
    from the mapping. Returns mountPath -> the local directory."""
    files: dict[str, Path] = {}
    for mount, secret in mounted_secrets(workload).items():
        local = root / mount.strip("/").replace("/", "_")
        local.mkdir(parents=True)
        contents = (external or {}).get(secret) or secret_files(directory, secret.rsplit("-", 1)[0])
        for name, text in contents.items():
            (local / name).write_text(config_text if name == "headwater.toml" else text)
        files[mount] = local
    return files


def pod_environment(workload: dict[str, Any], files: dict[str, Path]) -> dict[str, str]:
    """The container's environment as the pod has it, mounted paths moved to where `pod_files` wrote them."""
    env: dict[str, str] = {}
    for variable in container(workload).get("env", []):
        if "value" in variable:
            value = str(variable["value"])
            for mount, local in files.items():
                value = value.replace(mount, str(local))
            env[variable["name"]] = value
        elif "fieldRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = f"{workload['metadata']['name']}-0"
    return env


def mounted_secrets(workload: dict[str, Any]) -> dict[str, str]:
    """mountPath -> Secret name, for the container's Secret volumes."""
    pod = workload["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in container(workload).get("volumeMounts", [])
        if m["name"] in secrets
    }

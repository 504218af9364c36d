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


def mounted_secrets(workload: dict[str, Any]) -> dict[str, str]:
    """mountPath -> Secret name, for the container's Secret volumes."""
    pod = workload["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in container(workload).get("volumeMounts", [])
        if m["name"] in secrets
    }

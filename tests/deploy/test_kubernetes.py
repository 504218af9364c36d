"""deploy/kubernetes: the kustomize base and the example overlay render, every object validates offline
against the Kubernetes schemas (the Strimzi resources, custom kinds, are checked against what the
processes create instead), the pods run as non-root on a read-only root filesystem with requests,
credentials are only in Secrets, and the probes, ports, Secret names and environment variables are the
ones the processes use: the processes are started with a manifest's environment and their probes asked."""

from __future__ import annotations

import asyncio
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from rigs.kafka import HeadwaterProcess, toml_text, topics_for, wait_for
from rigs.kubernetes import (
    BASE,
    HOST_SETTINGS,
    KUBERNETES,
    OVERLAY,
    PORT_SETTINGS,
    command,
    config_doc,
    container,
    mounted_secrets,
    objects,
    pod_environment,
    pod_files,
    port_number,
    probes,
    render,
    secret_files,
    workload,
    workloads,
)

from pipeline.config import ENV_OVERRIDES, TENANTS_FILE_ENV, Settings, TopicSettings, load_settings
from pipeline.kafka.local import free_port
from pipeline.sources import SOURCES

KUBERNETES_VERSION = "1.30.0"  # the oldest minor still in common support when these were written
DIRECTORIES = [pytest.param(BASE, id="base"), pytest.param(OVERLAY, id="overlay")]
# Secrets the manifests use but do not generate: made by the Kafka operator or the cluster's admin.
EXTERNAL_SECRETS = {
    "headwater-dlq-page",  # optional: the DLQ page token
    "headwater-receiver",
    "headwater-worker",
    "headwater-rewards",  # Strimzi KafkaUser passwords
    "headwater-kafka-cluster-ca-cert",  # Strimzi's cluster CA
}
KNOWN_ENV = (
    {"HEADWATER_CONFIG", TENANTS_FILE_ENV, f"{TENANTS_FILE_ENV}_FILE", "POD_NAME"}
    | set(ENV_OVERRIDES)
    | {f"{name}_FILE" for name in ENV_OVERRIDES}
)


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(directory: Path) -> None:
    rendered = render(directory)
    assert {o["kind"] for o in rendered} >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
    }
    for obj in rendered:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validation_is_not_vacuous() -> None:
    """A misspelt field fails the strict validation used above."""
    broken = {**workload(BASE, "headwater-receiver")}
    broken["spec"] = {**broken["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_pods_run_unprivileged_on_a_read_only_root_with_requests(directory: Path) -> None:
    for obj in workloads(directory):
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        spec = container(obj)
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(spec["resources"]["requests"])
        writable = {m["mountPath"] for m in spec["volumeMounts"] if not m.get("readOnly")}
        assert "/tmp" in writable, obj["metadata"]["name"]


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_the_receiver_has_an_autoscaler_and_a_disruption_budget(directory: Path) -> None:
    receiver = workload(directory, "headwater-receiver")
    [hpa] = objects(directory, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": receiver["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    labels = receiver["spec"]["template"]["metadata"]["labels"]
    budgets = [
        p
        for p in objects(directory, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(budgets) == 1 and budgets[0]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    [service] = [s for s in objects(directory, "Service") if s["metadata"]["name"] == "headwater-receiver"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]  # never the operator port


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_workers_are_no_more_than_the_partitions_they_share(directory: Path) -> None:
    worker = workload(directory, "headwater-worker")
    assert worker["kind"] == "StatefulSet"
    assert 1 <= worker["spec"]["replicas"] <= config_doc(directory)["kafka"]["partitions"]


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_the_configuration_is_a_generated_secret_that_rolls_the_pods(directory: Path) -> None:
    """The config and the tenants are Secrets whose names carry kustomize's content hash, and every pod
    mounts them by that name: a changed file is a new name, so every workload rolls."""
    generated = {s["metadata"]["name"] for s in objects(directory, "Secret")}
    for base_name in ("headwater-config", "headwater-tenants"):
        [name] = [n for n in generated if n.rsplit("-", 1)[0] == base_name]
        assert name != base_name
        for obj in workloads(directory):
            assert name in mounted_secrets(obj).values(), obj["metadata"]["name"]


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_credentials_are_only_in_secrets(directory: Path, tmp_path: Path) -> None:
    """No environment variable carries a literal secret, nothing outside a Secret names a tenant key, every
    Secret a pod uses is generated here or named as an external one, and every HEADWATER_* variable
    is one Headwater reads."""
    generated = {s["metadata"]["name"] for s in objects(directory, "Secret")}
    for obj in workloads(directory):
        spec = container(obj)
        for variable in spec.get("env", []):
            assert variable["name"] in KNOWN_ENV, variable["name"]
            if any(word in variable["name"] for word in ("PASSWORD", "TOKEN", "KEY")):
                assert variable["name"].endswith("_FILE") or "valueFrom" in variable, variable
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["name"] in generated | EXTERNAL_SECRETS
        for secret in mounted_secrets(obj).values():
            assert secret in generated | EXTERNAL_SECRETS, secret
    config = tmp_path / "headwater.toml"
    config.write_text(secret_files(directory, "headwater-config")["headwater.toml"])
    sasl = config_doc(directory)["kafka"].get("security_protocol", "").startswith("SASL_")
    login = {"HEADWATER_KAFKA_SASL_USERNAME": "u", "HEADWATER_KAFKA_SASL_PASSWORD": "p"} if sasl else {}
    loaded = load_settings(config, environ=login)
    assert loaded.tenants == () and loaded.kafka.create_topics is False
    shipped = tomllib.loads(secret_files(directory, "headwater-tenants")["tenants.toml"])
    assert shipped.get("tenants", []) == []  # the repository ships no tenant credential


@pytest.mark.parametrize("directory", DIRECTORIES)
def test_probes_and_ports_are_the_ones_the_config_serves_on(directory: Path) -> None:
    """Every named container port is the port its config key sets, bound beyond loopback (the kubelet and
    Prometheus reach the pod IP); every probe is an HTTP GET on one of them with a timeout."""
    config = config_doc(directory)
    for obj in workloads(directory):
        spec = container(obj)
        keys = PORT_SETTINGS[command(obj)]
        assert {p["name"] for p in spec["ports"]} == set(keys)
        for name, (section, key) in keys.items():
            assert config[section][key] == port_number(spec, name), (obj["metadata"]["name"], name)
            host_section, host_key = HOST_SETTINGS[section, key]
            assert config[host_section][host_key] == "0.0.0.0"
        found = probes(spec)
        assert {"startupProbe", "livenessProbe"} <= set(found), obj["metadata"]["name"]
        for probe in found.values():
            assert probe["httpGet"]["port"] in keys and probe["timeoutSeconds"] >= 2
    receiver = container(workload(directory, "headwater-receiver"))
    assert receiver["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert receiver["readinessProbe"]["timeoutSeconds"] > 3  # /readyz waits up to 3 s for Kafka
    worker = container(workload(directory, "headwater-worker"))
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a restore may take minutes


def test_the_operator_topics_have_the_partitions_the_config_routes_by() -> None:
    """deploy/kubernetes/strimzi/topics.yaml: the keyed topic and the dedup changelog have
    kafka.partitions partitions (the worker refuses to start otherwise); every raw topic exists."""
    listed = strimzi_topics()
    partitions = config_doc(BASE)["kafka"]["partitions"]
    assert (
        listed["headwater.keyed"]["partitions"]
        == listed["headwater-dedup-changelog"]["partitions"]
        == partitions
    )
    assert {f"raw.{source}" for source in SOURCES} <= set(listed)
    for spec in listed.values():
        assert spec["replicas"] >= 3 and spec["config"]["min.insync.replicas"] == 2


def strimzi_topics() -> dict[str, dict[str, Any]]:
    """Topic name -> KafkaTopic spec, from deploy/kubernetes/strimzi/topics.yaml."""
    docs = [d for d in yaml.safe_load_all((KUBERNETES / "strimzi" / "topics.yaml").read_text()) if d]
    return {d["spec"].get("topicName", d["metadata"]["name"]): d["spec"] for d in docs}


async def _topics_named(bootstrap: str, prefix: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()


def _default_name(topic: str, prefix: str) -> str:
    """A topic this test's processes created, under the default names and app id the manifests use."""
    defaults = TopicSettings()
    for field, name in topics_for(prefix).items():
        default = getattr(defaults, field)
        if field == "raw_prefix" and topic.startswith(name):
            return default + topic[len(name) :]
        if topic == name:
            return str(default)
    assert topic.startswith(prefix + "-"), topic
    return "headwater" + topic[len(prefix) :]


@pytest.mark.slow
def test_processes_started_with_the_manifests_environment_answer_their_probes(
    make_settings: Callable[..., Settings], tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Receiver, worker and dispatcher run with the base's environment and its config Secret (the broker,
    topic names, ports and data dir made this test's; create_topics on, as the test broker has none of
    the operator's topics). Each answers every probe path of its manifest, on the port the manifest
    names, within the probe's timeout."""
    doc = config_doc(BASE)
    prefix = make_settings().worker.app_id
    doc["kafka"] |= {
        "bootstrap_servers": kafka_bootstrap,
        "create_topics": True,
        "partitions": 2,
        "replication_factor": 1,
    }
    doc["topics"] = topics_for(prefix)
    doc["worker"] |= {"app_id": prefix, "data_dir": str(tmp_path / "state" / "worker")}
    doc["rewards"] = {**doc.get("rewards", {}), "tick": "0.5s"}
    ports: dict[tuple[str, str], int] = {}
    for keys in PORT_SETTINGS.values():
        for section, key in keys.values():
            ports[section, key] = doc[section][key] = free_port()
    settings = Settings.model_validate(doc)
    started: list[tuple[dict[str, Any], HeadwaterProcess]] = []
    try:
        for obj in workloads(BASE):
            files = pod_files(BASE, obj, tmp_path / obj["metadata"]["name"], toml_text(settings))
            env = pod_environment(obj, files)
            assert Path(env["HEADWATER_CONFIG"]).is_file() and Path(env[TENANTS_FILE_ENV]).is_file()
            process = HeadwaterProcess(
                list(command(obj)), tmp_path / f"{obj['metadata']['name']}.log", env=env
            )
            started.append((obj, process))
        for obj, process in started:
            _answers_its_probes(obj, process, ports)
        created = asyncio.run(_topics_named(kafka_bootstrap, prefix))
        assert created and {_default_name(t, prefix) for t in created} <= set(strimzi_topics())
    finally:
        for _, process in started:
            process.stop()


def _probe_status(probe: dict[str, Any], port: int) -> int:
    """What the kubelet would see: the status of GET path on the port, within the probe's timeout."""
    url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe["timeoutSeconds"]) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _answers_its_probes(
    obj: dict[str, Any], process: HeadwaterProcess, ports: dict[tuple[str, str], int]
) -> None:
    """The startup probe passes (within three minutes: the test machine may be loaded), then every other
    probe of the container passes."""
    keys = PORT_SETTINGS[command(obj)]
    found = probes(container(obj))
    seen: list[int] = []

    def passes(probe: dict[str, Any]) -> bool:
        assert process.process.poll() is None, process.output()
        seen.append(_probe_status(probe, ports[keys[probe["httpGet"]["port"]]]))
        return seen[-1] == 200

    for kind in ("startupProbe", *sorted(set(found) - {"startupProbe"})):
        probe = found[kind]

        def explain(kind: str = kind, probe: dict[str, Any] = probe) -> str:
            where = f"{obj['metadata']['name']} {kind} {probe['httpGet']['path']}"
            return f"{where}: last status {seen[-1] if seen else None}\n{process.output()[-4000:]}"

        def passing(probe: dict[str, Any] = probe) -> bool:
            return passes(probe)

        wait_for(passing, timeout=180 if kind == "startupProbe" else 60, explain=explain)

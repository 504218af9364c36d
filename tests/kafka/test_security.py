"""Kafka security end to end: one broker whose only listener the processes use is SASL_SSL (SCRAM users
made when its storage was formatted, a certificate from a CA made here). The receiver, a worker, the
reward dispatcher and the CLI tools run through it; a wrong password or an untrusted certificate ends a
process at start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from rigs.kafka import HeadwaterProcess, die_with_parent, toml_text, wait_for
from rigs.kubernetes import OVERLAY, command, config_doc, container, pod_environment, pod_files, workload
from rigs.tls import ThrowawayAuthority

from pipeline.config import LocalKafkaSettings, Settings
from pipeline.errors import KafkaAccessRefused
from pipeline.kafka.local import LocalKafka, SecuredListener, free_port
from pipeline.kafka.security import verify_access

USER, PASSWORD = "headwater", "scram-secret-for-tests"
# The Kafka user the example Kubernetes overlay gives the receiver (a Strimzi KafkaUser there).
OVERLAY_RECEIVER_USER, OVERLAY_RECEIVER_PASSWORD = "headwater-receiver", "receiver-scram-secret"


class SecuredBroker:
    def __init__(
        self, broker: LocalKafka, authority: ThrowawayAuthority, stranger: ThrowawayAuthority
    ) -> None:
        self.broker = broker
        self.authority = authority
        self.stranger = stranger  # a CA the broker's certificate does not come from


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    root = tmp_path_factory.mktemp("secured")
    authority = ThrowawayAuthority(root / "tls")
    issued = authority.issue("broker")
    users = {USER: PASSWORD, OVERLAY_RECEIVER_USER: OVERLAY_RECEIVER_PASSWORD}
    listener = SecuredListener(free_port(), issued.certfile, issued.keyfile, users)
    local = LocalKafkaSettings(port=free_port(), controller_port=free_port(), data_dir=root / "kafka")
    broker = LocalKafka(local, listener)
    broker.up(bound_to_parent=True)
    try:
        yield SecuredBroker(broker, authority, ThrowawayAuthority(root / "stranger", "stranger"))
    finally:
        broker.down()


@pytest.fixture
def secured_settings(
    secured: SecuredBroker, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    def factory(password: str = PASSWORD, cafile: Path | None = None, **kafka: Any) -> Settings:
        return make_settings(
            kafka={
                "bootstrap_servers": secured.broker.secured_bootstrap,
                "partitions": 2,
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": USER,
                "sasl_password": password,
                "ssl_cafile": str(cafile or secured.authority.cafile),
                **kafka,
            },
            receiver={"port": free_port(), "ack_timeout_s": 10.0},
        )

    return factory


def _config(settings: Settings, path: Path) -> dict[str, str]:
    """Write the settings without the SASL password, which goes to a file named by the environment."""
    password = settings.kafka.sasl_password
    assert password is not None
    lines = [ln for ln in toml_text(settings).splitlines() if not ln.startswith("sasl_password")]
    path.write_text("\n".join(lines) + "\n")
    secret = path.with_suffix(".password")
    secret.write_text(password.get_secret_value() + "\n")
    return {**os.environ, "HEADWATER_CONFIG": str(path), "HEADWATER_KAFKA_SASL_PASSWORD_FILE": str(secret)}


def _headwater(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=die_with_parent,
        check=False,
    )


def _started(env: dict[str, str], log_path: Path, *args: str) -> HeadwaterProcess:
    return HeadwaterProcess(list(args), log_path, env=env)


def _post(url: str, body: bytes, key: str) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"X-API-KEY": key, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=15) as answer:
        return int(answer.status)


@pytest.mark.slow
def test_receiver_worker_dispatcher_and_tools_run_through_sasl_ssl(
    secured_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """An event goes receiver -> worker -> events.canonical and `headwater tail` prints it; a reward for a
    tenant without a webhook goes receiver -> dispatcher (its stage loops) -> rewards.dlq, and
    `headwater rewards dlq ls` lists it; `headwater dlq stats` reads the DLQ. All over SASL_SSL only."""
    settings = secured_settings()
    env = _config(settings, tmp_path / "headwater.toml")
    receiver = _started(env, tmp_path / "receiver.log", "receiver")
    worker = _started(env, tmp_path / "worker.log", "worker", "--source", "customerglu")
    dispatcher = _started(env, tmp_path / "rewards.log", "rewards", "run")
    try:
        base = f"http://127.0.0.1:{settings.receiver.port}"

        def ready() -> bool:
            assert receiver.process.poll() is None, receiver.output()
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout=60, explain=receiver.output)
        event = {
            "event_id": "evt_secured_1",
            "event_name": "kyc_completed",
            "user_id": "usr_1",
            "timestamp": "2024-03-01T12:00:00Z",
        }
        assert _post(f"{base}/server/v4", orjson.dumps(event), "wk_acme_1") == 200
        reward = {"campaignId": "c-1", "type": "direct", "userId": "usr_1", "rewardId": "r-secured-1"}
        assert _post(f"{base}/rewards/v1", orjson.dumps(reward), "rk_acme_1") == 200

        def canonical() -> list[Any]:
            assert worker.process.poll() is None, worker.output()
            tailed = _headwater(env, "tail", settings.topics.canonical, "--from-beginning", "-n", "1")
            assert tailed.returncode == 0, tailed.stderr
            return [orjson.loads(line) for line in tailed.stdout.splitlines()]

        (record,) = wait_for(canonical, timeout=90, interval=1.0, explain=worker.output)
        assert record["event_id"] == "evt_secured_1"
        assert record["tenant"] == "acme"

        def undelivered() -> str:
            assert dispatcher.process.poll() is None, dispatcher.output()
            listed = _headwater(env, "rewards", "dlq", "ls", "--json")
            assert listed.returncode == 0, listed.stderr
            return listed.stdout if "r-secured-1" in listed.stdout else ""

        assert "no_webhook" in wait_for(undelivered, timeout=90, interval=1.0, explain=dispatcher.output)
        stats = _headwater(env, "dlq", "stats")
        assert stats.returncode == 0, stats.stderr
    finally:
        receiver.stop()
        worker.stop()
        dispatcher.stop()


@pytest.mark.parametrize(
    "command",
    [
        ["receiver"],
        ["worker", "--source", "customerglu"],
        ["rewards", "run"],
        ["tail", "x"],
        ["dlq", "stats"],
    ],
)
def test_a_wrong_password_ends_the_process_at_start(
    secured_settings: Callable[..., Settings], tmp_path: Path, command: list[str]
) -> None:
    env = _config(secured_settings(password="not-the-password"), tmp_path / "headwater.toml")
    result = _headwater(env, *command)
    assert result.returncode == 1
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "refused SASL_SSL/SCRAM-SHA-512 login as 'headwater'" in line
    # the one line: no outage warning, no retry, no traceback before it
    assert [ln for ln in result.stderr.splitlines() if " INFO " not in ln] == [line], result.stderr
    assert "not-the-password" not in result.stderr + result.stdout


def test_an_untrusted_certificate_ends_the_receiver_at_start(
    secured: SecuredBroker, secured_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    env = _config(secured_settings(cafile=secured.stranger.cafile), tmp_path / "headwater.toml")
    result = _headwater(env, "receiver")
    assert result.returncode == 1
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "TLS certificate is not trusted" in line
    assert [ln for ln in result.stderr.splitlines() if " INFO " not in ln] == [line], result.stderr


def test_the_kubernetes_overlay_receiver_logs_in_with_its_environment_and_secrets(
    secured: SecuredBroker, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The example overlay's receiver: its config Secret, its environment (user name, password file) and
    the two Secrets Strimzi would write (the user's password, the cluster CA) mounted where the manifest
    mounts them. Only the broker address, topics and ports are this test's. It logs in over SASL_SSL and
    its readiness probe passes."""
    receiver = workload(OVERLAY, "headwater-receiver")
    doc = config_doc(OVERLAY)
    assert doc["kafka"]["security_protocol"] == "SASL_SSL"
    test = make_settings()
    doc["kafka"] |= {
        "bootstrap_servers": secured.broker.secured_bootstrap,
        "create_topics": True,
        "partitions": 2,
        "replication_factor": 1,
    }
    doc["topics"] = test.topics.model_dump()
    doc["receiver"] |= {"port": free_port(), "operator_port": free_port()}
    login = {"sasl_username": "from-the-environment", "sasl_password": "from-a-file"}
    settings = Settings.model_validate({**doc, "kafka": {**doc["kafka"], **login}})
    config = "".join(
        line + "\n"
        for line in toml_text(settings).splitlines()
        if not line.startswith(("sasl_username", "sasl_password"))
    )
    external = {
        OVERLAY_RECEIVER_USER: {"password": OVERLAY_RECEIVER_PASSWORD},
        "headwater-kafka-cluster-ca-cert": {"ca.crt": secured.authority.cafile.read_text()},
    }
    files = pod_files(OVERLAY, receiver, tmp_path / "pod", config, external)
    config_path = Path(pod_environment(receiver, files)["HEADWATER_CONFIG"])
    # kafka.ssl_cafile names the CA where the pod mounts it; the test mounted that directory here
    mounted_ca = str(doc["kafka"]["ssl_cafile"])
    ca_mount = next(m for m in files if mounted_ca.startswith(m + "/"))
    config_path.write_text(
        config_path.read_text().replace(mounted_ca, str(files[ca_mount] / mounted_ca[len(ca_mount) + 1 :]))
    )
    env = pod_environment(receiver, files)
    assert env["HEADWATER_KAFKA_SASL_USERNAME"] == OVERLAY_RECEIVER_USER
    process = HeadwaterProcess(list(command(receiver)), tmp_path / "receiver.log", env=env)
    try:
        readiness = container(receiver)["readinessProbe"]["httpGet"]
        url = f"http://127.0.0.1:{settings.receiver.port}{readiness['path']}"

        def ready() -> bool:
            assert process.process.poll() is None, process.output()
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout=60, explain=process.output)
    finally:
        process.stop()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_both_scram_mechanisms_log_in_and_a_wrong_password_is_refused(
    secured_settings: Callable[..., Settings], mechanism: str
) -> None:
    """The access check (the one every process makes at start) accepts the right login under either SCRAM
    mechanism and refuses a wrong password with KafkaAccessRefused."""
    assert asyncio.run(verify_access(secured_settings(sasl_mechanism=mechanism).kafka)) is True
    with pytest.raises(KafkaAccessRefused, match=f"refused SASL_SSL/{mechanism} login"):
        asyncio.run(verify_access(secured_settings(password="wrong", sasl_mechanism=mechanism).kafka))

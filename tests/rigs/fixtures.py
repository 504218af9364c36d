"""Session fixtures: one real Kafka broker per test session, unique topics per test, receivers on loopback.

The broker is HEADWATER_TEST_BOOTSTRAP if set; else testcontainers' Kafka when a Docker engine answers;
else our own local broker (pipeline.kafka.local) on free ports in a temp dir. It never skips: a session
that cannot get a broker fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from rigs.kafka import LoopThread, WorkerProcess, start_local_broker, topics_for
from rigs.watch import WATCHERS

TENANTS: list[dict[str, Any]] = [
    {
        "id": "acme",
        "write_keys": ["wk_acme_1"],
        "rewards_keys": ["rk_acme_1"],
        "usermaven_tokens": ["ak_acme.st_acme"],
        "webengage": {"license_code": "~acme1234", "secret_key": "whsec_acme"},
    },
    {
        "id": "globex",
        "write_keys": ["wk_globex_1"],
        "rewards_keys": ["rk_globex_1"],
        "usermaven_tokens": ["ak_globex.st_globex"],
        "webengage": {"license_code": "~globex99", "secret_key": "whsec_globex"},
    },
]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


@pytest.fixture(autouse=True)
def topic_watchers() -> Iterator[None]:
    """The test's topic reads share one reader per broker (rigs.watch); it is closed when the test ends."""
    yield
    WATCHERS.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real broker for the whole session."""
    if os.environ.get("HEADWATER_TEST_BOOTSTRAP"):
        yield os.environ["HEADWATER_TEST_BOOTSTRAP"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = start_local_broker(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker.bootstrap
    finally:
        broker.down()


def unique(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    return f"t_{name}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_settings(
    kafka_bootstrap: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[..., Settings]:
    """Settings on the session broker with topic names unique to this test."""
    prefix = unique(request)

    def factory(**sections: Any) -> Settings:
        doc: dict[str, Any] = {
            "kafka": {"bootstrap_servers": kafka_bootstrap, "partitions": 3},
            "local_kafka": {"enabled": False},
            "topics": topics_for(prefix),
            "receiver": {"port": 0, "operator_port": 0, "ack_timeout_s": 5.0},
            "worker": {"app_id": prefix, "data_dir": str(tmp_path / "worker"), "web_port": 0},
            "tenants": TENANTS,
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(doc.get(section), dict):
                doc[section] = {**doc[section], **values}
            else:
                doc[section] = values
        return Settings.model_validate(doc)

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture
def start_receiver(loop_thread: LoopThread) -> Iterator[Callable[[Settings], str]]:
    """Start a Receiver on an ephemeral loopback port; returns its base URL. Stopped after the test."""
    from pipeline.ingest.receiver import Receiver

    started: list[Receiver] = []

    def start(settings: Settings) -> str:
        receiver = Receiver(settings)
        port = loop_thread.run(receiver.start())
        started.append(receiver)
        return f"http://127.0.0.1:{port}"

    yield start
    for receiver in started:
        loop_thread.run(receiver.stop())


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `headwater worker` subprocesses on given Settings; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, *args: str) -> WorkerProcess:
        running = {w.data_dir for w in started if w.process.poll() is None}
        if settings.worker.data_dir in running:  # a worker locks its data dir: a second one gets its own
            settings = settings.with_overrides({"worker.data_dir": str(tmp_path / f"data{len(started)}")})
        worker = WorkerProcess(settings, tmp_path / f"worker{len(started)}.toml", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()

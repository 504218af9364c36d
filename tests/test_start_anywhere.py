"""Long-running commands start from any directory with only HEADWATER_CONFIG set."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from rigs.kafka import produce_raw, read_records, toml_text, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_from_empty_dir(tmp_path: Path) -> Iterator[Callable[[Settings, list[str]], subprocess.Popen[bytes]]]:
    """Start `headwater <args>` with cwd an empty directory and the config only in HEADWATER_CONFIG."""
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings, args: list[str]) -> subprocess.Popen[bytes]:
        cwd = tmp_path / f"empty{len(started)}"
        cwd.mkdir()
        config = tmp_path / f"config{len(started)}.toml"
        config.write_text(toml_text(settings))
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "HEADWATER_CONFIG": str(config)}
        log = (tmp_path / f"command{len(started)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_worker_started_in_an_empty_directory_processes_an_event(
    make_settings: Callable[..., Settings], run_from_empty_dir: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """With the default relative worker.data_dir, `headwater worker` creates it (and its parents) and runs."""
    settings = make_settings(worker={"data_dir": ".headwater/worker", "web_port": free_port()})
    body = orjson.dumps(
        {"event_id": "anywhere_1", "event_name": "tick", "user_id": "u1", "timestamp": 1709294400}
    )
    produce_raw(settings, "customerglu", [body])
    worker = run_from_empty_dir(settings, ["worker", "--source", "customerglu"])
    wait_for(lambda: read_records(settings, settings.topics.canonical), timeout=90)
    assert worker.poll() is None
    event = orjson.loads(read_records(settings, settings.topics.canonical)[0].value)
    assert event["event_id"] == "anywhere_1"


def test_a_receiver_started_in_an_empty_directory_accepts_a_request(
    make_settings: Callable[..., Settings], run_from_empty_dir: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """`headwater receiver` needs no directory of its own: from an empty cwd it answers and writes raw."""
    port = free_port()
    settings = make_settings(receiver={"port": port})
    receiver = run_from_empty_dir(settings, ["receiver"])
    body = orjson.dumps(
        {"event_id": "anywhere_2", "event_name": "tick", "user_id": "u1", "timestamp": 1709294400}
    )

    def post() -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/server/v4",
            data=body,
            headers={"X-API-KEY": "wk_acme_1", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except OSError:
            return 0

    assert wait_for(lambda: post() == 200, timeout=60, interval=0.5)
    assert receiver.poll() is None
    assert [r.value for r in read_records(settings, settings.topics.raw("customerglu"))][:1] == [body]

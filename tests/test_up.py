"""`headwater up` as a new user runs it: from an empty directory with only its config (README quick start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
from rigs.kafka import read_records, toml_text, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            status: int = response.status
            return status
    except OSError:
        return 0


def test_up_runs_two_rocksdb_workers_side_by_side_from_an_empty_directory(
    make_settings: object, tmp_path: Path
) -> None:
    """Two workers of `up --workers 2` each get their own data dir (a RocksDB store has one owner); `up`
    prints one "ready" line once the receiver answers and the workers own every partition; an event sent
    then comes out canonical within seconds, and Ctrl-C stops everything with exit code 0."""
    assert callable(make_settings)
    ports = {"receiver": free_port(), "worker": free_port(), "rewards": free_port()}
    settings: Settings = make_settings(
        receiver={"port": ports["receiver"], "ack_timeout_s": 5.0},
        worker={"app_id": f"up-{ports['worker']}", "data_dir": "state/worker", "web_port": ports["worker"]},
        dedup={"store": "rocksdb://"},
        rewards={"web_port": ports["rewards"]},
    )
    home = tmp_path / "empty"
    home.mkdir()
    config = tmp_path / "headwater.toml"
    config.write_text(toml_text(settings))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "up", "--workers", "2", "--no-rewards"],
        cwd=home,
        env={**os.environ, "HEADWATER_CONFIG": str(config)},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def ready_lines() -> list[str]:
            return [
                line
                for line in (tmp_path / "up.log").read_text(errors="replace").splitlines()
                if " ready in " in line
            ]

        [ready] = wait_for(ready_lines, timeout=90)
        assert f"receiver http://127.0.0.1:{ports['receiver']}" in ready and f"config {config}" in ready
        assert settings.topics.canonical in ready
        for port in (ports["worker"], ports["worker"] + 1):  # what "ready" promised: every partition owned
            health = orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3).read())
            assert health["stages"]["dedup"]["partitions"] == settings.kafka.partitions
        body = orjson.dumps(
            {"event_id": "up_1", "event_name": "kyc", "user_id": "u1", "timestamp": "2024-03-01T12:00:00Z"}
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['receiver']}/server/v4",
            data=body,
            headers={"X-API-KEY": "wk_acme_1"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        [event] = wait_for(lambda: read_records(settings, settings.topics.canonical), timeout=60)
        assert orjson.loads(event.value)["event_id"] == "up_1"
        for port in (ports["worker"], ports["worker"] + 1):
            wait_for(lambda: get(f"http://127.0.0.1:{port}/metrics") == 200, timeout=60)  # noqa: B023
        assert {p.name for p in (home / "state" / "worker").iterdir()} == {"worker-0", "worker-1"}
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        log.close()
    output = (tmp_path / "up.log").read_text(errors="replace")
    assert "StoreLocked" not in output and "Traceback" not in output, output[-3000:]
    assert len([line for line in output.splitlines() if " ready in " in line]) == 1

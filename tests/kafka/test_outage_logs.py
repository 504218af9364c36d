"""A broker outage is logged quietly: one line when Kafka becomes unreachable, a summary at most every
`logging.kafka_outage_summary_s` while it lasts, one line when it is back; health and readiness carry it.

A real `headwater worker` and `headwater receiver` on a broker of the test's own, which is stopped for
OUTAGE_S seconds. The outage lasts 20 s with a summary every 5 s: the same behaviour as 60 s with the
default 30 s (the lines depend on the number of summary periods, 4 here and 2 there), in a third of the
time. Before: 36,096 lines from one worker in a one-minute outage.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rigs.kafka import HeadwaterProcess, WorkerProcess, start_local_broker, toml_text, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import free_port

OUTAGE_S = 20.0
SUMMARY_S = 5.0
MAX_LINES = 30  # "a few dozen", for the whole outage, per process


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())
    except OSError:
        return 0, {}


@pytest.mark.slow
def test_a_broker_outage_writes_a_few_lines_and_the_endpoints_say_so(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    broker = start_local_broker(tmp_path / "kafka")
    processes: list[HeadwaterProcess] = []
    try:
        settings = make_settings(
            kafka={"bootstrap_servers": broker.bootstrap, "partitions": 1},
            receiver={"port": free_port(), "operator_port": free_port()},
            worker={"web_port": free_port()},
            logging={"kafka_outage_summary_s": SUMMARY_S},
        )
        config = tmp_path / "headwater.toml"
        config.write_text(toml_text(settings))
        receiver = HeadwaterProcess(["--config", str(config), "receiver"], tmp_path / "receiver.log")
        worker = WorkerProcess(settings, tmp_path / "worker.toml")
        processes += [receiver, worker]
        operator = f"http://127.0.0.1:{settings.receiver.operator_port}"
        health = f"http://127.0.0.1:{settings.worker.web_port}/health"
        wait_for(lambda: get_json(operator + "/readyz")[0] == 200, timeout=90, interval=0.5)
        wait_for(lambda: get_json(health)[0] == 200, timeout=90, interval=0.5)
        before = {p: len(p.output().splitlines()) for p in processes}

        broker.down()
        stopped = time.monotonic()
        ready, during = wait_for(
            lambda: (
                (r := get_json(operator + "/readyz"))[0] == 503
                and r[1].get("kafka", {}).get("reachable") is False
                and r
            ),
            timeout=OUTAGE_S,
            interval=0.5,
        )
        worker_health = wait_for(
            lambda: (h := get_json(health)[1]).get("kafka", {}).get("reachable") is False and h,
            timeout=OUTAGE_S,
            interval=0.5,
        )
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))  # the outage lasts OUTAGE_S
        broker.up(bound_to_parent=True)
        for process in processes:
            wait_for(
                lambda: "Kafka reachable again" in process.output(),  # noqa: B023 (called in this iteration)
                timeout=90,
                interval=0.5,
                explain=lambda: process.output()[-3000:],  # noqa: B023
            )
        wait_for(lambda: get_json(operator + "/readyz")[0] == 200, timeout=60, interval=0.5)

        assert during["kafka"]["unreachable_since"]
        assert worker_health["kafka"]["failed_attempts"] >= 1
        for process in processes:
            lines = process.output().splitlines()[before[process] :]
            text = "\n".join(lines)
            assert len(lines) <= MAX_LINES, text
            assert text.count(f"Kafka unreachable ({broker.bootstrap}) since") == 1, text
            assert text.count("Kafka reachable again") == 1, text
            assert not [line for line in lines if " aiokafka." in line], text  # aiokafka's own lines: none
        worker_lines = worker.output().splitlines()[before[worker] :]
        assert sum("still unreachable" in line for line in worker_lines) >= 2, worker_lines
    finally:
        for process in processes:
            process.stop()
        broker.down()

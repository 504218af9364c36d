"""No single raw record can stop or slow its partition, on a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
from rigs.kafka import WorkerProcess, produce_raw, read_records, toml_text, wait_for

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics
from pipeline.kafka.local import free_port
from pipeline.records import DeadLetter

REPO = Path(__file__).resolve().parents[2]


def event(i: int, **extra: object) -> bytes:
    return orjson.dumps(
        {"event_id": f"e_{i}", "event_name": "tick", "user_id": f"u{i}", "timestamp": 1709294400 + i, **extra}
    )


def deep_properties(depth: int) -> bytes:
    """A CustomerGlu body whose event_properties nest `depth` levels (orjson reads it, cannot write it)."""
    return (
        b'{"event_id":"deep","event_name":"tick","user_id":"u0","timestamp":1709294400,"event_properties":'
        + b'{"k":' * depth
        + b"1"
        + b"}" * depth
        + b"}"
    )


def canonical_ids(settings: Settings) -> list[str]:
    return [orjson.loads(r.value)["event_id"] for r in read_records(settings, settings.topics.canonical)]


def letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter.from_json(r.value) for r in read_records(settings, settings.topics.dlq)]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def metric(port: int, name: str) -> float:
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_deeply_nested_request_is_dead_lettered_and_the_events_behind_it_flow(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    """JSON nested 300 levels deep (valid, but not writable by orjson) becomes nesting_too_deep, and the
    good events written after it on the same partition come out."""
    produce_raw(settings, "customerglu", [event(1), deep_properties(300), event(2), event(3)], partition=0)
    start_worker(settings, "--source", "customerglu")
    wait_for(lambda: {"e_1", "e_2", "e_3"} <= set(canonical_ids(settings)), timeout=90)
    assert [d.reason for d in wait_for(lambda: letters(settings))] == ["nesting_too_deep"]


def test_a_record_whose_output_kafka_refuses_is_isolated_and_dead_lettered(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """The keyed topic refuses records over 20 kB: the batch fails, is retried, then processed record by
    record; the one record that fails alone becomes output_refused and every other event comes out."""
    port = free_port()
    settings = make_settings(worker={"web_port": port, "isolate_after_failures": 2, "batch_max": 50})
    asyncio.run(ensure_topics(settings, [settings.topics.keyed], config={"max.message.bytes": "20000"}))
    bodies = [event(i) for i in range(20)]
    bodies.insert(7, event(99, event_properties={"blob": "z" * 30_000}))
    produce_raw(settings, "customerglu", bodies, partition=0)
    start_worker(settings, "--source", "customerglu")
    wait_for(lambda: {f"e_{i}" for i in range(20)} <= set(canonical_ids(settings)), timeout=120)
    refused = wait_for(lambda: [d for d in letters(settings) if d.reason == "output_refused"], timeout=30)
    assert [orjson.loads(d.body)["event_id"] for d in refused] == ["e_99"]
    assert "e_99" not in canonical_ids(settings)
    assert metric(port, "headwater_worker_batches_retried_total") >= 2
    assert metric(port, "headwater_worker_records_isolated_total") == 1
    assert metric(port, "headwater_worker_dedup_entries") == 20  # what this worker's table holds


def test_health_fails_while_a_stage_has_lag_and_makes_no_progress(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """A stage that keeps retrying one batch: /health answers 503 after worker.stall_limit_s, the stage's
    seconds since commit grow on /metrics; before that, an idle worker is healthy."""
    port = free_port()
    settings = make_settings(
        worker={"web_port": port, "isolate_after_failures": 1_000_000, "stall_limit_s": 3}
    )
    asyncio.run(ensure_topics(settings, [settings.topics.keyed], config={"max.message.bytes": "20000"}))
    start_worker(settings, "--source", "customerglu")
    assert wait_for(lambda: get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=60)
    produce_raw(settings, "customerglu", [event(1, event_properties={"blob": "z" * 30_000})], partition=0)
    status, text = wait_for(lambda: (r := get(f"http://127.0.0.1:{port}/health"))[0] == 503 and r, timeout=90)
    assert orjson.loads(text)["stages"]["normalize:customerglu"]["stalled"] is True
    assert metric(port, 'headwater_worker_seconds_since_commit{stage="normalize:customerglu"}') > 3
    assert wait_for(lambda: metric(port, "headwater_worker_batches_retried_total") >= 1, timeout=60)


FAULT = """
import sys
from pipeline.config import load_settings
from pipeline.stream import normalize_stage
from pipeline.stream.worker import Worker

def broken(*args, **kwargs):
    raise RuntimeError("injected fault: the normalize loop dies")

normalize_stage.record_lag = broken
Worker(load_settings(sys.argv[1]), ["customerglu"]).run()
"""


def test_a_stage_whose_loop_dies_ends_the_worker_with_a_non_zero_exit(
    settings: Settings, tmp_path: Path
) -> None:
    """A normalize loop that raises (a fault injected in the child process) stops the whole worker with
    exit code 70, so a supervisor restarts it instead of leaving a worker without that stage."""
    config = tmp_path / "worker.toml"
    config.write_text(toml_text(settings))
    script = tmp_path / "faulty_worker.py"
    script.write_text(FAULT)
    log = tmp_path / "faulty.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
        )
        try:
            code = process.wait(90)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 70, log.read_text()[-3000:]
    assert "stage normalize died" in log.read_text()

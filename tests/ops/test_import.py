"""`headwater import` against a real broker and worker: receiver-shaped raw records marked as imported,
a rate, a resume point that survives Ctrl-C and a crash, and every event once on events.canonical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from rigs.kafka import WorkerProcess, read_records, toml_text, wait_for

from pipeline.config import Settings
from pipeline.ops.importing import IMPORTED_HEADER, ImportState, bodies, count_events, input_files
from pipeline.records import RawHeaders


def usermaven_body(first: int, count: int) -> bytes:
    """A bulk Usermaven body: `count` events with their own ids and historical timestamps."""
    return orjson.dumps([
        {"api_key": "ak_acme", "event_id": f"hist-{i}", "event_type": "signed_up",
         "user": {"id": f"u{i % 97}"}, "_timestamp": 1_600_000_000_000 + i, "src": "usermaven"}
        for i in range(first, first + count)
    ])  # fmt: skip


def headwater(config: Path, *args: str, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), "import", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def state(cwd: Path) -> ImportState | None:
    files = list((cwd / ".headwater" / "imports").glob("*.json"))
    return ImportState.model_validate_json(files[0].read_bytes()) if files else None


def test_bodies_resume_after_the_acknowledged_position(tmp_path: Path) -> None:
    """A directory's NDJSON lines and JSON files, in path order; from a resume point, only what follows it."""
    (tmp_path / "a.ndjson").write_bytes(b'{"n":1}\n\n[{"n":2},{"n":3}]\r\n')
    (tmp_path / "b.json").write_bytes(b'{"events":[{"n":4},{"n":5}]}')
    (tmp_path / "notes.txt").write_text("not an input")
    files = input_files(tmp_path)
    assert [f.name for f in files] == ["a.ndjson", "b.json"]
    every = list(bodies(files, 0, 0))
    assert [b.value for b in every] == [b'{"n":1}', b'[{"n":2},{"n":3}]', b'{"events":[{"n":4},{"n":5}]}']
    assert [count_events(b.value) for b in every] == [1, 2, 2]
    first = every[0]
    assert [b.value for b in bodies(files, first.file_index, first.end)] == [b.value for b in every[1:]]


@pytest.mark.slow
def test_a_hundred_thousand_events_interrupted_and_resumed_come_out_once_each(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """100,000 events in 200 bulk bodies: Ctrl-C part way (exit 130, resume point saved), a kill -9 part
    way further, then a run to the end. Every event is on events.canonical exactly once, with its own
    timestamp; every raw record carries the receiver's headers and hw-imported."""
    settings = make_settings(kafka={"partitions": 3})
    config = tmp_path / "headwater.toml"
    config.write_text(toml_text(settings))
    export = tmp_path / "export.ndjson"
    export.write_bytes(b"".join(usermaven_body(i * 500, 500) + b"\n" for i in range(200)))
    home = tmp_path / "home"
    home.mkdir()
    args = (str(export), "--tenant", "acme", "--source", "usermaven", "--rate", "25000")

    first = headwater(config, *args, cwd=home)
    wait_for(lambda: (s := state(home)) is not None and s.records >= 20, timeout=60)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, err.decode()
    assert b"resumes at" in err
    interrupted = state(home)
    assert interrupted is not None and not interrupted.done and 0 < interrupted.records < 200

    second = headwater(config, *args, cwd=home)
    wait_for(lambda: (s := state(home)) is not None and s.records >= interrupted.records + 20, timeout=60)
    os.kill(second.pid, signal.SIGKILL)  # a crash: the chunk in flight may be written and sent again
    second.communicate(timeout=30)

    third = headwater(config, *args, cwd=home)
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err.decode()
    assert b"imported" in out and b"resuming import" in err
    final = state(home)
    assert final is not None and final.done and final.import_id == interrupted.import_id

    raw = read_records(settings, settings.topics.raw("usermaven"))
    assert len(raw) == 200  # what the killed run wrote after its last saved point was found, not sent again
    for record in raw:
        headers = RawHeaders.from_kafka(record.headers)
        assert (headers.tenant, headers.source, headers.received_at) == (
            "acme",
            "usermaven",
            final.started_at,
        )
        assert (
            headers.vendor["api_key"] == "ak_acme"
            and dict(record.headers)[IMPORTED_HEADER] == final.import_id.encode()
        )

    start_worker(settings, "--source", "usermaven")
    started = time.monotonic()

    def canonical() -> list[dict[str, object]]:
        return [orjson.loads(r.value) for r in read_records(settings, settings.topics.canonical)]

    events = wait_for(lambda: (e := canonical()) and len(e) >= 100_000 and e, timeout=300, interval=2)
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)) == 100_000, f"{len(ids)} events, {len(set(ids))} ids"
    sample = next(e for e in events if e["event_id"] == "hist-12345")
    assert (
        sample["timestamp"] == "2020-09-13T12:26:52.345000+00:00"
    )  # its own _timestamp, not the import time
    assert read_records(settings, settings.topics.dlq) == []
    print(f"100,000 imported events canonical {time.monotonic() - started:.1f}s after the worker started")

"""Dead letters proportional to the request, on a real broker."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from rigs.kafka import WorkerProcess, produce_raw, read_records, toml_text, wait_for

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.kafka.local import free_port
from pipeline.records import DeadLetter, RawHeaders


def rss_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def failing_items(count: int, padding: int) -> list[dict[str, object]]:
    """Segment track calls without any identity: every one is missing_user_identity."""
    return [
        {
            "type": "track",
            "event": "No Identity",
            "messageId": f"m{i}",
            "timestamp": "2024-03-01T12:00:00Z",
            "properties": {"p": "x" * padding},
        }
        for i in range(count)
    ]


def hw_dlq(settings: Settings, tmp_path: Path, *args: str) -> str:
    config = tmp_path / f"dlq-{time.monotonic_ns()}.toml"
    config.write_text(toml_text(settings))
    result = CliRunner().invoke(
        main, ["--config", str(config), "dlq", *args], catch_exceptions=False, env={"COLUMNS": "250"}
    )
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_a_5_mb_batch_whose_every_item_fails_costs_bounded_memory_and_bytes(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """~43,000 failing items in a 5 MB body: the worker's peak RSS grows by less than 200 MB, the dead
    letters total at most 20 x the body + 1 MiB (the body is stored once), and between the letters of the
    first items and the summary's ranges every item is accounted for."""
    port = free_port()
    settings = make_settings(worker={"web_port": port})
    items = failing_items(43_000, 3)
    body = orjson.dumps(items)
    assert 4_500_000 < len(body) <= 5_242_880
    worker = start_worker(settings, "--source", "segment")
    wait_for(lambda: b"ok" in _health(port), timeout=60)
    before = rss_kib(worker.process.pid, "VmRSS")
    produce_raw(settings, "segment", [body])
    wait_for(
        lambda: any(b"more_failed_items" in r.value for r in read_records(settings, settings.topics.dlq)),
        timeout=240,
        interval=1,
    )
    growth_mb = (rss_kib(worker.process.pid, "VmHWM") - before) / 1024
    records = read_records(settings, settings.topics.dlq)
    total = sum(len(r.value) for r in records)
    assert growth_mb < 200, growth_mb
    assert total <= 20 * len(body) + 1024 * 1024, total
    letters = [DeadLetter.from_json(r.value) for r in records]
    [summary] = [d.summary for d in letters if d.summary is not None]
    covered = [d.index for d in letters if d.index is not None]
    covered += [i for first, last in summary.ranges for i in range(first, last + 1)]
    assert sorted(covered) == list(range(len(items)))
    assert sum(1 for d in letters if d.body_b64 is not None) == 1


@pytest.mark.slow
def test_a_bulk_body_of_100_000_tiny_failing_items_makes_letters_proportional_to_the_body(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """`[0,0,0,...]` to a batched source: the first items one letter each and one summary letter (counts per
    reason, index ranges) for the rest, at most 10,000 letters and 20 x the body + 1 MiB; the summary letter
    shows and redrives the exact request."""
    body = b"[" + b",".join([b"0"] * 100_000) + b"]"
    produce_raw(settings, "segment", [body])
    start_worker(settings, "--source", "segment")
    wait_for(
        lambda: any(b"more_failed_items" in r.value for r in read_records(settings, settings.topics.dlq)),
        timeout=180,
        interval=1,
    )
    records = read_records(settings, settings.topics.dlq)
    assert len(records) <= 10_000, len(records)
    assert sum(len(r.value) for r in records) <= 20 * len(body) + 1024 * 1024
    letters = [DeadLetter.from_json(r.value) for r in records]
    [summary_letter] = [d for d in letters if d.summary is not None]
    summary = summary_letter.summary
    assert summary is not None
    individual = sorted(d.index for d in letters if d.index is not None)
    assert summary.items + len(individual) == 100_000
    assert summary.ranges == ((len(individual), 99_999),) and individual == list(range(len(individual)))
    assert sum(summary.counts.values()) == summary.items

    shown = orjson.loads(hw_dlq(settings, tmp_path, "show", summary_letter.id, "--json"))
    assert base64.b64decode(shown["body_b64"]) == body
    hw_dlq(settings, tmp_path, "redrive", "--ids", summary_letter.id)
    assert [r.value for r in read_records(settings, settings.topics.raw("segment"))] == [body, body]


def _health(port: int) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return bytes(response.read())
    except OSError:
        return b""


def test_show_export_and_redrive_rebuild_the_exact_request_from_a_letter_without_the_body(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """A letter that only points to its record's body: `dlq show` prints that body, `dlq export` carries
    the carrier along, and `dlq redrive` republishes the original bytes with the original headers."""
    good = {
        "type": "track",
        "event": "Ok",
        "messageId": "ok_1",
        "userId": "u1",
        "timestamp": "2024-03-01T12:00:00Z",
    }
    body = orjson.dumps([*failing_items(3, 10), good])
    produce_raw(settings, "segment", [body])
    start_worker(settings, "--source", "segment")
    wait_for(lambda: len(read_records(settings, settings.topics.dlq)) >= 3, timeout=90)
    letters = [DeadLetter.from_json(r.value) for r in read_records(settings, settings.topics.dlq)]
    [carrier] = [d for d in letters if d.body_b64 is not None]
    referrer = next(d for d in letters if d.body_ref == carrier.id)

    shown = orjson.loads(hw_dlq(settings, tmp_path, "show", referrer.id, "--json"))
    assert base64.b64decode(shown["body_b64"]) == body

    lines = [
        orjson.loads(line)
        for line in hw_dlq(
            settings, tmp_path, "export", "--source", "segment", "--reason", "missing_user_identity"
        ).splitlines()
    ]
    assert {d["id"] for d in lines} == {d.id for d in letters}
    assert [base64.b64decode(d["body_b64"]) for d in lines if d["body_b64"]] == [body]

    hw_dlq(settings, tmp_path, "redrive", "--ids", referrer.id)
    raw = read_records(settings, settings.topics.raw("segment"))
    assert [r.value for r in raw] == [body, body]
    original, redriven = sorted(
        (RawHeaders.from_kafka(r.headers) for r in raw), key=lambda h: h.redrive_count
    )
    assert (original.redrive_count, redriven.redrive_count) == (0, 1)
    assert redriven.model_copy(update={"redrive_count": 0}) == original

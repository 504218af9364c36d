"""`headwater dlq` on a real broker: list, show, stats, export, redrive, the redrive limit."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner, Result
from rigs.dlq import config_file, letter, put
from rigs.kafka import WorkerProcess, produce_raw, read_records, wait_for

from adapters import ADAPTERS
from pipeline.cli import main
from pipeline.config import Settings
from pipeline.ops.dlq import redrive_log_topic
from pipeline.records import DeadLetter, Origin, RawHeaders, RawRecord, utc_now
from pipeline.stream.record_outcomes import outcomes

KEY = {"X-API-KEY": "wk_acme_1", "Content-Type": "application/json"}


# --- helpers ---------------------------------------------------------------------------------------------


def hw(config: Path, *args: str) -> Result:
    """`headwater --config CONFIG dlq ARGS...` in-process."""
    return CliRunner().invoke(
        main, ["--config", str(config), "dlq", *args], catch_exceptions=False, env={"COLUMNS": "250"}
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def canonical_ids(settings: Settings) -> Counter[str]:
    return Counter(
        orjson.loads(r.value)["event_id"] for r in read_records(settings, settings.topics.canonical)
    )


def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter.from_json(r.value) for r in read_records(settings, settings.topics.dlq)]


@pytest.fixture
def populated(settings: Settings, tmp_path: Path) -> tuple[Settings, Path, list[DeadLetter]]:
    """Five dead letters of two sources, two tenants, three reasons, one an hour old."""
    hour_ago = utc_now() - timedelta(hours=1)
    letters = [
        letter(settings, "segment", "acme", "missing_user_identity", offset=0, index=1),
        letter(settings, "segment", "globex", "missing_user_identity", offset=1, index=0),
        letter(settings, "customerglu", "acme", "invalid_json", "parse", offset=0, index=None, body=b"nope{"),
        letter(settings, "segment", "acme", "wrong_type:userId", offset=2, index=0, failed_at=hour_ago),
        letter(
            settings,
            "customerglu",
            "acme",
            "validation_failed",
            "validate",
            offset=1,
            index=None,
            body=b'{"event_name": "x"}',
        ),
    ]
    put(settings, letters)
    return settings, config_file(settings, tmp_path), letters


# --- listing, showing, exporting --------------------------------------------------------------------------


def test_ls_filters_by_source_tenant_reason_stage_and_time_newest_first(populated: Any) -> None:
    """ls narrows by every filter, lists newest first and --json gives one stored dead letter per line."""
    _, config, letters = populated

    def ids(*args: str) -> list[str]:
        result = hw(config, "ls", "--json", *args)
        assert result.exit_code == 0, result.output
        return [doc["id"] for doc in json_lines(result.stdout)]

    newest_first = [d.id for d in sorted(letters, key=lambda d: d.failed_at, reverse=True)]
    assert ids() == newest_first
    assert ids("--limit", "2") == newest_first[:2]
    assert set(ids("--source", "customerglu")) == {letters[2].id, letters[4].id}
    assert ids("--tenant", "globex") == [letters[1].id]
    assert set(ids("--reason", "missing_user_identity")) == {letters[0].id, letters[1].id}
    assert ids("--reason", "wrong_type") == [letters[3].id]  # the code's prefix matches wrong_type:<field>
    assert ids("--stage", "validate") == [letters[4].id]
    assert letters[3].id not in ids("--since", "30m")
    assert ids("--until", "30m") == [letters[3].id]
    table = hw(config, "ls", "--source", "segment", "--tenant", "acme")
    assert table.exit_code == 0
    assert "missing_user_identity" in table.stdout and "2 dead letter(s)" in table.stdout


def test_export_then_parse_back_equals_ls(populated: Any, tmp_path: Path) -> None:
    """export writes the selection as stored; parsed back it equals `ls --json`, original bytes included."""
    _, config, letters = populated
    out = tmp_path / "export.jsonl"
    exported = hw(config, "export", "--source", "segment", "--output", str(out))
    assert exported.exit_code == 0 and "exported 3 dead letter(s)" in exported.stderr
    listed = hw(config, "ls", "--json", "--source", "segment", "--limit", "1000")
    back = [DeadLetter.from_json(line) for line in out.read_bytes().splitlines()]
    assert back == [DeadLetter.from_json(line) for line in listed.stdout.encode().splitlines()]
    assert {d.id: d.body for d in back} == {d.id: d.body for d in letters if d.source == "segment"}
    to_stdout = hw(config, "export", "--reason", "invalid_json")
    assert [DeadLetter.from_json(line) for line in to_stdout.stdout.encode().splitlines()] == [letters[2]]


def test_show_prints_reason_errors_headers_and_the_pretty_body(populated: Any) -> None:
    """show gives one dead letter in full, the JSON body indented, a non-JSON body as it is."""
    _, config, letters = populated
    result = hw(config, "show", letters[4].id)
    assert result.exit_code == 0, result.output
    for text in ("validation_failed", "hw-request-id", "req_1", '"event_name": "x"', letters[4].origin.ref()):
        assert text in result.stdout
    raw = hw(config, "show", letters[2].id)
    assert "nope{" in raw.stdout and "not JSON" in raw.stdout
    doc = orjson.loads(hw(config, "show", "--json", letters[0].id).stdout)
    assert (doc["id"], doc["reason"], doc["body"], doc["redriven"]) == (
        letters[0].id,
        "missing_user_identity",
        [{"type": "track"}],
        None,
    )


def test_a_bad_or_unknown_id_is_one_line_and_exit_2(populated: Any) -> None:
    """An id that names nothing, or is not an id at all, prints one error line and exits 2."""
    _, config, _ = populated
    for bad in ("dl_" + "0" * 24, "not-an-id"):
        result = hw(config, "show", bad)
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and bad in result.stderr
    assert hw(config, "redrive", "--ids", "dl_" + "f" * 24).exit_code == 2


def test_show_body_prints_the_original_bytes_only(populated: Any) -> None:
    """`dlq show ID --body` writes the stored request exactly, ready to be corrected and redriven."""
    _, config, letters = populated
    result = hw(config, "show", letters[2].id, "--body")
    assert result.exit_code == 0 and result.stdout_bytes == b"nope{"


def test_a_corrected_body_goes_back_under_the_original_headers(populated: Any, tmp_path: Path) -> None:
    """redrive --body sends the given bytes to raw.<source> with the letter's tenant and request id, count +
    1,
    and the redrive log marks it edited; a selection of several raw records is refused in one line."""
    settings, config, letters = populated
    fixed = tmp_path / "fixed.json"
    fixed.write_bytes(b'{"event_id":"e1","event_name":"x","user_id":"u1","timestamp":"2024-03-01T12:00:00Z"}')
    refused = hw(config, "redrive", "--source", "customerglu", "--body", str(fixed))
    assert refused.exit_code == 1 and "covers 2 raw records" in refused.stderr
    done = hw(config, "redrive", "--ids", letters[4].id, "--body", str(fixed))
    assert done.exit_code == 0 and "corrected body" in done.stdout
    [record] = read_records(settings, settings.topics.raw("customerglu"))
    headers = RawHeaders.from_kafka(record.headers)
    assert record.value == fixed.read_bytes()
    assert (headers.tenant, headers.request_id, headers.redrive_count) == ("acme", "req_1", 1)
    [entry] = [orjson.loads(r.value) for r in read_records(settings, redrive_log_topic(settings))]
    assert (entry["id"], entry["edited"], entry["redrive_count"]) == (letters[4].id, True, 1)


def test_stats_counts_by_source_and_reason_with_bars(populated: Any) -> None:
    """stats counts source x reason over the range; the terminal form draws a bar per row."""
    _, config, _ = populated
    rows = json_lines(hw(config, "stats", "--json").stdout)
    assert {(r["source"], r["reason"]): r["count"] for r in rows} == {
        ("segment", "missing_user_identity"): 2,
        ("segment", "wrong_type:userId"): 1,
        ("customerglu", "invalid_json"): 1,
        ("customerglu", "validation_failed"): 1,
    }
    recent = json_lines(hw(config, "stats", "--json", "--since", "30m").stdout)
    assert sum(r["count"] for r in recent) == 4
    table = hw(config, "stats")
    assert table.exit_code == 0 and "█" * 30 in table.stdout and "5 dead letter(s)" in table.stdout


def test_an_empty_dlq_or_an_empty_time_range_says_so_and_exits_0(
    populated: Any, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """No dead letters (a DLQ topic that does not exist, or a range before them all): one line, exit 0."""
    _, config, _ = populated
    prefix = f"t_empty_{time.monotonic_ns()}"
    empty = config_file(make_settings(topics={"dlq": f"{prefix}.dlq"}), tmp_path)
    for cfg, extra in (
        (empty, []),
        (config, ["--since", "2001-01-01", "--until", "2001-01-02T00:00:00+00:00"]),
    ):
        for command in ("ls", "stats", "export"):
            result = hw(cfg, command, *extra)
            assert result.exit_code == 0, result.output
            assert "no dead letters match" in result.output
            assert "dl_" not in result.stdout
        assert hw(cfg, "redrive", "--everything", *extra).stdout.strip() == "no dead letters match"


# --- redrive -------------------------------------------------------------------------------------------


def test_redrive_republishes_each_raw_record_once_with_its_headers_and_count_plus_one(
    settings: Settings, tmp_path: Path
) -> None:
    """Two failed items of one bulk body go back as one raw record: same bytes, same headers, count + 1;
    --dry-run writes nothing; redriven letters leave the listing (--all shows them)."""
    bulk = b'[{"a": 1}, {"b": 2}, {"c": 3}]'
    letters = [
        letter(settings, offset=5, index=0, body=bulk),
        letter(settings, offset=5, index=2, body=bulk),
        letter(settings, offset=6, index=0, body=b"{}", redrive_count=2),
        letter(settings, offset=7, reason="redrive_limit", stage="parse", index=None, redrive_count=4),
    ]
    put(settings, letters)
    config = config_file(settings, tmp_path)
    dry = hw(config, "redrive", "--source", "segment", "--dry-run", "--json")
    assert orjson.loads(dry.stdout) | {"records": []} == {
        "selected": 4,
        "republished": 0,
        "skipped": 1,
        "merged": 1,
        "dry_run": True,
        "records": [],
    }
    assert read_records(settings, settings.topics.raw("segment")) == []

    done = hw(config, "redrive", "--source", "segment")
    assert "selected 4 dead letter(s); republished 2 raw record(s)" in done.stdout
    assert "skipped 1" in done.stdout and "parked" in done.stdout
    raw = sorted(read_records(settings, settings.topics.raw("segment")), key=lambda r: len(r.value))
    assert [r.value for r in raw] == [b"{}", bulk]
    headers = [RawHeaders.from_kafka(r.headers) for r in raw]
    assert [h.redrive_count for h in headers] == [3, 1]
    assert [h.request_id for h in headers] == ["req_6", "req_5"]  # the original raw headers
    assert headers[1].model_copy(update={"redrive_count": 0}) == letters[0].raw_headers()

    left = json_lines(hw(config, "ls", "--json").stdout)
    assert [d["id"] for d in left] == [letters[3].id]  # only the parked one
    everything = hw(config, "ls", "--all", "--wide")  # the redrives column is a --wide one
    assert everything.stdout.count("(redriven)") == 3
    assert hw(config, "redrive", "--source", "segment").stdout.strip().startswith("selected 1 dead letter(s)")
    reset = hw(config, "redrive", "--ids", letters[3].id, "--reset-count", "--json")
    assert orjson.loads(reset.stdout)["republished"] == 1
    newest = max(read_records(settings, settings.topics.raw("segment")), key=lambda r: r.timestamp)
    assert RawHeaders.from_kafka(newest.headers).redrive_count == 1


def test_redrive_needs_a_selection(populated: Any) -> None:
    """redrive without ids, filters or --everything is a usage error, so nothing goes back by accident."""
    _, config, _ = populated
    result = hw(config, "redrive")
    assert result.exit_code == 2 and "--everything" in result.output


def test_a_record_past_the_redrive_limit_is_one_redrive_limit_letter() -> None:
    """The driver parks a record whose redrive count exceeds the limit, without asking the adapter (pure)."""
    body = b'[{"type": "track", "event": "e", "userId": "u", "messageId": "m1", "timestamp": 0}, 7]'
    origin = Origin(topic="raw.segment", partition=0, offset=9)

    def run(count: int, limit: int) -> list[Any]:
        headers = RawHeaders(
            tenant="acme", source="segment", received_at=utc_now(), request_id="r", redrive_count=count
        )
        record = RawRecord(body=body, headers=headers, origin=origin)
        return list(outcomes(record, ADAPTERS["segment"], redrive_limit=limit))

    assert len(run(3, 3)) == 2  # at the limit: processed as usual (one event, one dead letter)
    [parked] = run(4, 3)
    assert isinstance(parked, DeadLetter)
    assert (parked.reason, parked.stage, parked.index, parked.redrive_count, parked.body) == (
        "redrive_limit",
        "parse",
        None,
        4,
        body,
    )
    assert [o.reason for o in run(1, 0)] == ["redrive_limit"]


def test_a_letter_redriven_past_the_limit_ends_as_redrive_limit(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """A record already redriven 3 times (the default limit) and redriven again is parked by the worker
    as `redrive_limit`, and ls shows the count 4."""
    produce_raw(settings, "customerglu", [b"{still broken"], redrive_count=3)
    start_worker(settings)
    [first] = wait_for(lambda: dead_letters(settings), timeout=60)
    assert (first.reason, first.redrive_count) == ("invalid_json", 3)
    config = config_file(settings, tmp_path)
    assert "republished 1 raw record(s)" in hw(config, "redrive", "--ids", first.id).stdout
    parked = wait_for(lambda: [d for d in dead_letters(settings) if d.reason == "redrive_limit"], timeout=60)
    assert [(d.redrive_count, d.body, d.id != first.id) for d in parked] == [(4, b"{still broken", True)]
    [row] = json_lines(hw(config, "ls", "--json").stdout)
    assert (row["id"], row["reason"], row["redrive_count"]) == (parked[0].id, "redrive_limit", 4)
    assert "4" in hw(config, "ls", "--wide").stdout  # the redrives column is a --wide one


# --- the fix-and-redrive story -------------------------------------------------------------------------

# A worker whose segment adapter predates `page` support: it rejects page calls as unsupported_type.
OLD_RELEASE = """
import sys, types
from adapters import ADAPTERS, segment
from pipeline import reasons
from pipeline.adapting import reject
from pipeline.config import load_settings
from pipeline.stream.worker import Worker

def normalize(record, meta):
    if isinstance(record, dict) and record.get("type") == "page":
        reject(reasons.UNSUPPORTED_TYPE, "this release does not support page calls", path="type")
    return segment.normalize(record, meta)

kept = ("SOURCE", "BATCHED", "ROUTES", "AUTH", "REQUEST_META", "parse")
old = types.SimpleNamespace(**{k: getattr(segment, k) for k in kept}, normalize=normalize)
Worker(load_settings(sys.argv[1]), ["segment", "customerglu"], {**ADAPTERS, "segment": old}).run()
"""


@pytest.fixture
def old_release_worker(tmp_path: Path) -> Iterator[Callable[[Settings], subprocess.Popen[bytes]]]:
    """A worker subprocess running OLD_RELEASE; stopped (SIGTERM, then SIGKILL) after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(settings: Settings) -> subprocess.Popen[bytes]:
        script = tmp_path / "old_release.py"
        script.write_text(OLD_RELEASE)
        log = (tmp_path / "old_release.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, str(script), str(config_file(settings, tmp_path))],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_fix_and_redrive_turns_exactly_the_rejected_letters_into_events(
    settings: Settings,
    tmp_path: Path,
    start_receiver: Callable[[Settings], str],
    start_worker: Callable[..., WorkerProcess],
    old_release_worker: Callable[[Settings], subprocess.Popen[bytes]],
) -> None:
    """Requests through the receiver hit an adapter that rejects a shape; after the fix, `redrive --reason`
    turns exactly those dead letters into canonical events (the bulk's good item is not emitted twice),
    and the other dead letters stay."""
    base = start_receiver(settings)
    old = old_release_worker(settings)
    when = "2024-03-01T12:00:00Z"
    requests = [
        (
            "/segment/v4",
            [
                {
                    "type": "track",
                    "event": "Signup",
                    "messageId": "seg_1",
                    "userId": "u_9",
                    "timestamp": when,
                },
                {"type": "page", "name": "Pricing", "messageId": "seg_2", "userId": "u_9", "timestamp": when},
            ],
        ),
        (
            "/segment/v4",
            {"type": "page", "name": "Docs", "messageId": "seg_4", "anonymousId": "a_1", "timestamp": when},
        ),
        ("/segment/v4", {"type": "track", "event": "Nobody", "messageId": "seg_5", "timestamp": when}),
        ("/server/v4", "this is not json"),
    ]

    async def send_all() -> list[int]:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for path, body in requests:
                data = body.encode() if isinstance(body, str) else orjson.dumps(body)
                async with session.post(base + path, headers=KEY, data=data) as response:
                    statuses.append(response.status)
            return statuses

    assert asyncio.run(send_all()) == [200] * len(requests)
    before = wait_for(lambda: len(d := dead_letters(settings)) >= 4 and d, timeout=90)
    assert sorted(d.reason for d in before) == [
        "invalid_json",
        "missing_user_identity",
        "unsupported_type",
        "unsupported_type",
    ]
    wait_for(lambda: canonical_ids(settings) == Counter({"seg_1": 1}))
    stop(old)

    config = config_file(settings, tmp_path)
    result = hw(config, "redrive", "--reason", "unsupported_type")
    assert "selected 2 dead letter(s); republished 2 raw record(s)" in result.stdout
    assert "skipped 0" in result.stdout
    start_worker(settings)  # the fixed release
    wait_for(lambda: {"seg_2", "seg_4"} <= set(canonical_ids(settings)), timeout=90)
    assert canonical_ids(settings) == Counter({"seg_1": 1, "seg_2": 1, "seg_4": 1})
    assert len(dead_letters(settings)) == 4  # the redriven records produced no new dead letters
    remaining = json_lines(hw(config, "ls", "--json").stdout)
    assert sorted(d["reason"] for d in remaining) == ["invalid_json", "missing_user_identity"]
    assert len(json_lines(hw(config, "ls", "--json", "--all").stdout)) == 4


def test_time_values_are_utc_aware() -> None:
    """--since/--until accept ISO-8601 (naive = UTC) and durations ago."""
    from pipeline.ops.dlq_cli import make_filters

    filters = make_filters(since="2h", until="2024-03-01T12:00:00")
    assert filters.until == datetime(2024, 3, 1, 12, tzinfo=UTC)
    assert filters.since is not None and abs(utc_now() - timedelta(hours=2) - filters.since) < timedelta(
        seconds=5
    )

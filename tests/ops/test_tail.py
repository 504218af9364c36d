"""`headwater tail TOPIC` on a real broker: newest records as JSON lines, --meta, --from-beginning,
--follow, committed records only, and no Faust."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner, Result
from rigs.kafka import produce_raw, toml_text, wait_for

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.kafka.local import free_port
from pipeline.ops.tail import json_value, resolve_topic


def config_file(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / f"tail-{time.monotonic_ns()}.toml"
    path.write_text(toml_text(settings))
    return path


def tail(config: Path, *args: str) -> Result:
    """`headwater --config CONFIG tail ARGS...` in-process."""
    return CliRunner().invoke(main, ["--config", str(config), "tail", *args], catch_exceptions=False)


def lines(result: Result) -> list[Any]:
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    """Write `values` to `topic` round-robin over its partitions, one millisecond apart, in that order."""
    start_ms = int(time.time() * 1000) - len(values)

    async def run() -> None:
        await ensure_topics(settings, [topic])
        producer = make_producer(settings)
        await producer.start()
        try:
            for i, value in enumerate(values):
                partition = i % settings.kafka.partitions
                await producer.send_and_wait(topic, value, partition=partition, timestamp_ms=start_ms + i)
        finally:
            await producer.stop()

    asyncio.run(run())


def event(i: int) -> bytes:
    return orjson.dumps({"event_id": f"evt_{i}", "event_name": "kyc_completed", "n": i})


def test_tail_n_3_prints_the_three_newest_records_over_all_partitions_and_exits(
    settings: Settings, tmp_path: Path
) -> None:
    """`tail events.canonical -n 3` prints the three newest canonical events, oldest first, one JSON value
    a line; the default is ten; the config's name for the topic is used."""
    produce(settings, settings.topics.canonical, [event(i) for i in range(12)])
    config = config_file(settings, tmp_path)
    three = tail(config, "events.canonical", "-n", "3")
    assert three.exit_code == 0, three.output
    assert [doc["event_id"] for doc in lines(three)] == ["evt_9", "evt_10", "evt_11"]
    assert three.stdout.splitlines()[0].encode() == event(9)  # the value as stored
    assert [doc["n"] for doc in lines(tail(config, "events.canonical"))] == list(range(2, 12))


def test_meta_wraps_the_value_and_a_body_that_is_not_json_is_a_json_string(
    settings: Settings, tmp_path: Path
) -> None:
    """--meta adds topic, partition, offset, timestamp, key and headers; a raw body that is not JSON is
    printed as a JSON string; a literal topic name works as well as the shipped name."""
    produce_raw(settings, "customerglu", [b"this is not json"], tenant="acme")
    config = config_file(settings, tmp_path)
    for name in ("raw.customerglu", settings.topics.raw("customerglu")):
        [doc] = lines(tail(config, name, "--meta", "-n", "1"))
        assert doc["value"] == "this is not json"
        assert doc["topic"] == settings.topics.raw("customerglu")
        assert (doc["partition"] in range(3), doc["offset"], doc["key"]) == (True, 0, None)
        assert doc["timestamp"].endswith("Z")
        assert (doc["headers"]["hw-tenant"], doc["headers"]["hw-source"]) == ("acme", "customerglu")
    assert lines(tail(config, "raw.customerglu", "-n", "1")) == ["this is not json"]


def test_from_beginning_starts_at_the_oldest_record(settings: Settings, tmp_path: Path) -> None:
    """--from-beginning prints every record up to the end, each partition in order; -n caps it."""
    produce(settings, settings.topics.dlq, [event(i) for i in range(7)])
    config = config_file(settings, tmp_path)
    everything = lines(tail(config, "events.dlq", "--from-beginning"))
    assert sorted(doc["n"] for doc in everything) == list(range(7))
    for partition in range(3):
        mine = [doc["n"] for doc in everything if doc["n"] % 3 == partition]
        assert mine == sorted(mine)
    assert len(lines(tail(config, "events.dlq", "--from-beginning", "-n", "2"))) == 2


def test_only_committed_records_are_printed(settings: Settings, tmp_path: Path) -> None:
    """A transactional topic shows its committed records only: not the aborted ones, and not those of a
    transaction still open."""
    topic = settings.topics.canonical

    async def write() -> AIOKafkaProducer:
        await ensure_topics(settings, [topic])
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka.bootstrap_servers, transactional_id=f"{topic}-tail-test"
        )
        await producer.start()
        for value, commit in ((b'"committed"', True), (b'"aborted"', False)):
            await producer.begin_transaction()
            await producer.send_and_wait(topic, value, partition=0)
            await (producer.commit_transaction() if commit else producer.abort_transaction())
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b'"still open"', partition=0)
        return producer

    loop = asyncio.new_event_loop()
    producer = loop.run_until_complete(write())
    try:
        config = config_file(settings, tmp_path)
        assert lines(tail(config, "events.canonical")) == ["committed"]
        assert lines(tail(config, "events.canonical", "--from-beginning")) == ["committed"]
    finally:
        loop.run_until_complete(producer.abort_transaction())
        loop.run_until_complete(producer.stop())
        loop.close()


def test_an_unknown_topic_is_one_line_and_exit_1(settings: Settings, tmp_path: Path) -> None:
    """Tailing a topic that does not exist says so in one line."""
    result = CliRunner().invoke(
        main, ["--config", str(config_file(settings, tmp_path)), "tail", "no.such.topic"]
    )
    assert result.exit_code == 1
    assert result.output.strip() == f"error: no topic 'no.such.topic' on {settings.kafka.bootstrap_servers}"


FOLLOW = """
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("faust imported" if "faust" in sys.modules else "no faust", file=sys.stderr)
"""


def test_follow_prints_new_records_ctrl_c_ends_it_quietly_and_faust_is_never_imported(
    settings: Settings, tmp_path: Path
) -> None:
    """`tail --follow` prints the newest record, then each new one as it arrives; SIGINT ends it with exit
    0 and no traceback; the process never imported Faust."""
    produce(settings, settings.topics.canonical, [event(0)])
    script = tmp_path / "follow.py"
    script.write_text(FOLLOW)
    out, err = tmp_path / "follow.out", tmp_path / "follow.err"
    command = [sys.executable, str(script), "--config", str(config_file(settings, tmp_path))]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [*command, "tail", "events.canonical", "-n", "1", "--follow"],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            wait_for(lambda: out.read_text().count("\n") == 1, timeout=30)
            produce(settings, settings.topics.canonical, [event(1), event(2)])
            wait_for(lambda: out.read_text().count("\n") == 3, timeout=30)
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    printed = [orjson.loads(line)["n"] for line in out.read_text().splitlines()]
    assert printed[0] == 0 and sorted(printed[1:]) == [1, 2]  # followed: each partition in order
    assert err.read_text().strip().splitlines()[-1] == "no faust"
    assert "Traceback" not in err.read_text()


def test_json_values_keep_their_bytes_on_one_line() -> None:
    """A JSON value is printed as stored (line breaks between tokens become spaces, so 1e15 stays 1e15);
    invalid UTF-8 or text becomes a JSON string; a tombstone is null."""
    assert json_value(b'{\n  "a": 1e15,\r\n  "b": "x"\n}\n') == b'{   "a": 1e15,    "b": "x" }'
    assert json_value(b"\xffnot json") == orjson.dumps("\ufffdnot json")
    assert json_value(None) == b"null"


def test_shipped_topic_names_map_to_the_configured_ones(settings: Settings) -> None:
    """events.canonical, events.dlq, raw.<source> and the internal topics map to this config's names;
    anything else, including raw.<not a source>, is literal."""
    topics = settings.topics
    assert resolve_topic(settings, "events.canonical") == topics.canonical
    assert resolve_topic(settings, "events.dlq") == topics.dlq
    assert resolve_topic(settings, "headwater.keyed") == topics.keyed
    assert resolve_topic(settings, "raw.segment") == topics.raw("segment")
    assert resolve_topic(settings, "raw.nothing") == "raw.nothing"
    assert resolve_topic(settings, "orders") == "orders"


def test_an_unreachable_broker_is_one_error_line_and_exit_1(make_settings: Any, tmp_path: Path) -> None:
    """With no broker at the bootstrap address, tail prints one error line, exits 1, and leaves no
    consumer unclosed."""
    settings = make_settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    result = CliRunner().invoke(
        main, ["--config", str(config_file(settings, tmp_path)), "tail", "events.dlq"]
    )
    assert result.exit_code == 1
    assert f"error: connecting to Kafka at {settings.kafka.bootstrap_servers}: " in result.output
    assert "Traceback" not in result.output and "Unclosed" not in result.output

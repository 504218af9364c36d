"""Dead letters say which stage wrote them and what a redrive does with them, on a real broker: a letter
of the dedup stage holds a canonical event, and its redrive goes back through the dedup rules."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from click.testing import CliRunner
from rigs.dlq import config_file
from rigs.kafka import WorkerProcess, produce_raw, read_records, wait_for

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_admin
from pipeline.kafka.local import free_port
from pipeline.records import DeadLetter


def event(i: int, **extra: object) -> bytes:
    return orjson.dumps(
        {"event_id": f"e_{i}", "event_name": "tick", "user_id": f"u{i}", "timestamp": 1709294400 + i, **extra}
    )


def canonical_ids(settings: Settings) -> Counter[str]:
    records = read_records(settings, settings.topics.canonical)
    return Counter(orjson.loads(r.value)["event_id"] for r in records)


def refused(settings: Settings) -> list[DeadLetter]:
    letters = (DeadLetter.from_json(r.value) for r in read_records(settings, settings.topics.dlq))
    return [d for d in letters if d.reason == "output_refused"]


def duplicates_dropped(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    prefix = "headwater_worker_duplicates_dropped_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def set_max_message_bytes(settings: Settings, topic: str, limit: int) -> None:
    async def run() -> None:
        admin = make_admin(settings)
        await admin.start()
        try:
            resource = ConfigResource(
                ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": str(limit)}
            )
            await admin.alter_configs([resource])
        finally:
            await admin.close()

    asyncio.run(run())


def test_a_dedup_stage_letter_is_redriven_through_the_dedup_rules_and_comes_out_once(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """events.canonical refuses one event too big for it: the dedup stage dead-letters it (output_refused)
    as a canonical event from the keyed topic; once the topic takes it, `dlq redrive` sends it back to the
    keyed topic and it comes out once; redriving the same letter again is dropped as a duplicate."""
    port = free_port()
    settings = make_settings(worker={"web_port": port, "isolate_after_failures": 1})
    asyncio.run(ensure_topics(settings, [settings.topics.canonical], config={"max.message.bytes": "20000"}))
    bodies = [event(i) for i in range(5)]
    bodies.insert(2, event(99, event_properties={"blob": "z" * 30_000}))
    produce_raw(settings, "customerglu", bodies, partition=0)
    start_worker(settings, "--source", "customerglu")
    wait_for(lambda: {f"e_{i}" for i in range(5)} <= set(canonical_ids(settings)), timeout=120)
    [letter] = wait_for(lambda: refused(settings), timeout=60)

    assert (letter.worker_stage, letter.redrive_to) == ("dedup", "keyed")
    assert letter.origin.topic == settings.topics.keyed
    assert (letter.tenant, letter.source) == ("acme", "customerglu")
    assert orjson.loads(letter.body)["event_id"] == "e_99"  # the canonical event, not a request
    assert "e_99" not in canonical_ids(settings)

    set_max_message_bytes(settings, settings.topics.canonical, 1_000_000)  # the operator fixes the topic
    config = config_file(settings, tmp_path)
    runner = CliRunner()
    shown = runner.invoke(main, ["--config", str(config), "dlq", "show", letter.id], catch_exceptions=False)
    assert "the canonical event to the keyed topic" in shown.stdout
    first = runner.invoke(
        main,
        ["--config", str(config), "dlq", "redrive", "--reason", "output_refused"],
        catch_exceptions=False,
    )
    assert "republished 1" in first.stdout, first.stdout
    wait_for(
        lambda: canonical_ids(settings)["e_99"] == 1,
        timeout=60,
        explain=lambda: f"output_refused letters: {[d.message for d in refused(settings)]}",
    )

    dropped = duplicates_dropped(port)
    again = runner.invoke(
        main, ["--config", str(config), "dlq", "redrive", "--ids", letter.id], catch_exceptions=False
    )
    assert "republished 1" in again.stdout, again.stdout
    wait_for(lambda: duplicates_dropped(port) > dropped, timeout=60)
    assert canonical_ids(settings) == Counter({**{f"e_{i}": 1 for i in range(5)}, "e_99": 1})
    assert not [d for d in refused(settings) if d.id != letter.id]  # no new letter: it went through

"""Exactly once on events.canonical, as a read_committed reader sees it, across a broker restart and a
SIGKILL in the middle of a large bulk record."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from rigs.kafka import WorkerProcess, produce_raw, read_records, start_local_broker, wait_for

from pipeline.config import Settings
from pipeline.kafka.local import LocalKafka


def canonical_ids(settings: Settings) -> list[str]:
    """Event ids on events.canonical as a read_committed reader (all of ours) sees them."""
    return [orjson.loads(r.value)["event_id"] for r in read_records(settings, settings.topics.canonical)]


def single_events(first: int, count: int) -> list[bytes]:
    return [
        orjson.dumps(
            {"event_id": f"k_{i}", "event_name": "tick", "user_id": f"u{i % 97}", "timestamp": 1709294400 + i}
        )
        for i in range(first, first + count)
    ]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of this test alone (it is restarted), on free ports, gone at the end."""
    broker = start_local_broker(tmp_path / "kafka")
    try:
        yield broker
    finally:
        broker.down()


@pytest.mark.slow
def test_a_broker_restarted_mid_stream_loses_nothing_and_emits_nothing_twice(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], own_broker: LocalKafka
) -> None:
    """Kafka stops while the worker processes 8,000 events and comes back: every id is on events.canonical
    exactly once once the worker has caught up."""
    settings = make_settings(
        kafka={"bootstrap_servers": own_broker.bootstrap, "partitions": 3}, worker={"batch_max": 200}
    )
    produce_raw(settings, "customerglu", single_events(0, 4000))
    start_worker(settings, "--source", "customerglu")
    wait_for(lambda: len(canonical_ids(settings)) >= 500, timeout=120, interval=0.5)
    own_broker.down()
    own_broker.up(bound_to_parent=True)
    produce_raw(settings, "customerglu", single_events(4000, 4000))
    wait_for(lambda: len(set(canonical_ids(settings))) >= 8000, timeout=300, interval=1)
    ids = canonical_ids(settings)
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    assert set(ids) == {f"k_{i}" for i in range(8000)}


@pytest.mark.slow
def test_a_worker_killed_during_a_large_bulk_record_emits_each_of_its_events_once(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """Three 4,000-event Segment bodies (~3 MB each); the worker is SIGKILLed once the first events are
    out, restarted, and each of the 12,000 events is on events.canonical exactly once."""
    # One keyed record (~370 events) per dedup transaction: the dedup stage sends a transaction's events as
    # record batches, so with 20 records per batch all 12,000 were out before the kill could land.
    settings = make_settings(worker={"batch_max": 1})
    padding = "x" * 600
    bodies = [
        orjson.dumps(
            [
                {
                    "type": "track",
                    "event": "Big",
                    "messageId": f"big_{b}_{i}",
                    "userId": f"u{i % 50}",
                    "timestamp": "2024-03-01T12:00:00Z",
                    "properties": {"padding": padding},
                }
                for i in range(4000)
            ]
        )
        for b in range(3)
    ]
    produce_raw(settings, "segment", bodies)
    worker = start_worker(settings, "--source", "segment")
    wait_for(lambda: len(read_records(settings, settings.topics.keyed)) >= 1, timeout=120, interval=0.1)
    wait_for(lambda: canonical_ids(settings), timeout=120, interval=0.1)
    worker.kill()
    assert len(canonical_ids(settings)) < 12_000  # killed in the middle
    start_worker(settings, "--source", "segment")
    wait_for(lambda: len(set(canonical_ids(settings))) >= 12_000, timeout=240, interval=1)
    ids = canonical_ids(settings)
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    assert len(ids) == 12_000

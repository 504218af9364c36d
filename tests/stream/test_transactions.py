"""A dedup transaction's outputs, sent as record batches, reach Kafka as per-record sends did: every record
on the partition of Kafka's default partitioner, in order, all visible only once committed."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from rigs.kafka import read_records

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics
from pipeline.stream.transactions import Output, PartitionTransactions


def commit_once(settings: Settings, outputs: list[Output]) -> None:
    """One transaction of keyed partition 0 holding `outputs` and an offset of the keyed topic."""

    async def run() -> None:
        topics = settings.topics
        await ensure_topics(settings, [topics.keyed, topics.canonical, topics.dlq])
        transactions = PartitionTransactions(settings, f"{settings.worker.app_id}-dedup")
        await transactions.own({0})
        try:
            await transactions.commit(0, outputs, {TopicPartition(topics.keyed, 0): 1})
        finally:
            await transactions.close()

    asyncio.run(run())


def test_outputs_land_on_the_default_partitioners_partition_in_order(settings: Settings) -> None:
    """3,000 keyed events (several batches per partition) and records with a given partition: each keyed
    one on the partition DefaultPartitioner gives its key, each partition in the order of the outputs."""
    canonical, dlq = settings.topics.canonical, settings.topics.dlq
    outputs: list[Output] = [
        (canonical, f"acme/u{i % 41}".encode(), f"{i:06d}".encode() * 170, None) for i in range(3000)
    ]
    outputs += [(dlq, f"k{i}".encode(), f"{i}".encode(), 2) for i in range(100)]
    commit_once(settings, outputs)

    partitioner = DefaultPartitioner()
    expected: dict[int, list[bytes | None]] = defaultdict(list)
    for _, key, value, _ in outputs[:3000]:
        expected[partitioner(key, [0, 1, 2], [0, 1, 2])].append(value)
    found: dict[int, list[bytes | None]] = defaultdict(list)
    for record in read_records(settings, canonical):
        found[record.partition].append(record.value)
    assert found == expected
    letters = read_records(settings, dlq)
    assert {r.partition for r in letters} == {2}
    assert [r.value for r in letters] == [f"{i}".encode() for i in range(100)]


def test_a_record_larger_than_a_batch_goes_out_between_its_neighbours(settings: Settings) -> None:
    """An output over the producer's batch size (512 KiB) is sent alone, in its place among the others."""
    canonical = settings.topics.canonical
    values = [b"a" * 1000, b"b" * 700_000, b"c" * 1000]
    commit_once(settings, [(canonical, None, value, 1) for value in values])
    assert [r.value for r in read_records(settings, canonical)] == values

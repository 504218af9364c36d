"""The reading boundary on a real broker: ranges and their stop rule, committed records only, partitions of
a topic created after the reader started, offsets at a time, the newest records, and following a topic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import AIOKafkaProducer

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_admin, make_producer
from pipeline.kafka.reading import TopicReader, end_offsets, offsets_at, partitions, read_topic

T = TypeVar("T")
BASE_MS = 1_700_000_000_000  # record timestamps in these tests: fixed, so offsets at a time are known


def run(settings: Settings, body: Callable[[TopicReader], Awaitable[T]]) -> T:
    """`body(reader)` on a fresh reader, to the end."""

    async def main() -> T:
        async with TopicReader(settings) as reader:
            return await body(reader)

    return asyncio.run(main())


def produce(settings: Settings, topic: str, count: int, partitions: int = 3) -> None:
    """Records b"0", b"1", ... round-robin over the partitions; record i has timestamp BASE_MS + 1000 * i."""

    async def main() -> None:
        await ensure_topics(settings, [topic], partitions=partitions)
        producer = make_producer(settings)
        await producer.start()
        try:
            for i in range(count):
                await producer.send_and_wait(
                    topic, str(i).encode(), partition=i % partitions, timestamp_ms=BASE_MS + 1000 * i
                )
        finally:
            await producer.stop()

    asyncio.run(main())


def values(records: list[object]) -> list[int]:
    return [int(getattr(r, "value")) for r in records]  # noqa: B009 - records typed loosely on purpose


def test_a_range_read_returns_exactly_the_records_of_each_range_partition_by_partition(
    settings: Settings,
) -> None:
    """Partition p holds p, p+3, p+6, ...: each range's records come back, in offset order, nothing past
    an end; an empty range reads nothing; every end is reached (nothing unfinished)."""
    topic = settings.topics.canonical
    produce(settings, topic, 30)

    async def body(reader: TopicReader) -> tuple[list[int], dict[int, tuple[int, int]]]:
        records = await reader.read(topic, {0: (2, 5), 1: (0, 10), 2: (4, 4)})
        return values(records), reader.unfinished

    got, unfinished = run(settings, body)
    assert got == [6, 9, 12] + list(range(1, 30, 3))
    assert unfinished == {}


def test_chunks_bound_each_fetch_and_read_past_the_consumer_default_batch(settings: Settings) -> None:
    """A read in chunks of at most 7 records yields every record of the range once."""
    topic = settings.topics.canonical
    produce(settings, topic, 60, partitions=1)

    async def body(reader: TopicReader) -> list[list[int]]:
        return [values(chunk) async for chunk in reader.chunks(topic, {0: (5, 55)}, max_records=7)]

    chunks = run(settings, body)
    assert all(0 < len(chunk) <= 7 for chunk in chunks)
    assert [v for chunk in chunks for v in chunk] == list(range(5, 55))


def test_only_committed_records_are_read_and_the_read_ends_at_the_last_stable_offset(
    settings: Settings,
) -> None:
    """Aborted records and transaction markers take offsets but hold no records: the read still ends by
    reaching the end (not by giving up), and a transaction still open is not read."""
    topic = settings.topics.canonical

    async def write() -> AIOKafkaProducer:
        await ensure_topics(settings, [topic], partitions=1)
        producer = make_producer(settings, transactional_id=f"{topic}-reading-test")
        await producer.start()
        for value, commit in ((b"1", True), (b"2", False), (b"3", True)):
            await producer.begin_transaction()
            await producer.send_and_wait(topic, value, partition=0)
            await (producer.commit_transaction() if commit else producer.abort_transaction())
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"4", partition=0)
        return producer

    async def main() -> tuple[list[int], dict[int, tuple[int, int]], list[int]]:
        producer = await write()
        try:
            async with TopicReader(settings) as reader:
                started = time.monotonic()
                records = await reader.read(topic, await reader.bounds(topic), idle_fetches=None)
                assert time.monotonic() - started < 30  # idle_fetches=None: only reaching the end ends it
                return values(records), reader.unfinished, values(await read_topic(settings, topic))
        finally:
            await producer.abort_transaction()
            await producer.stop()

    got, unfinished, via_helper = asyncio.run(main())
    assert got == [1, 3]
    assert unfinished == {}
    assert via_helper == [1, 3]


def test_an_end_that_is_never_reached_ends_the_read_after_idle_fetches_and_says_where(
    settings: Settings,
) -> None:
    """A range past the partition's end returns what there is, and `unfinished` tells position and end."""
    topic = settings.topics.canonical
    produce(settings, topic, 4, partitions=1)

    async def body(reader: TopicReader) -> tuple[list[int], dict[int, tuple[int, int]]]:
        records = await reader.read(topic, {0: (1, 9)}, idle_fetches=2)
        return values(records), reader.unfinished

    got, unfinished = run(settings, body)
    assert got == [1, 2, 3]
    assert unfinished == {0: (4, 9)}


def test_a_topic_created_after_the_reader_started_is_found(settings: Settings) -> None:
    """The first answer for an unknown topic refreshes the metadata; `never` does not refresh."""
    topic = settings.topics.canonical

    async def body(reader: TopicReader) -> tuple[list[int], list[int], list[int], dict[int, int]]:
        before = await reader.partitions(topic)
        await ensure_topics(settings, [topic], partitions=2)
        unrefreshed = await reader.partitions(topic, refresh="never")
        after = await reader.partitions(topic)
        return before, unrefreshed, after, await reader.end_offsets(topic)

    before, unrefreshed, after, ends = run(settings, body)
    assert before == []
    assert unrefreshed == []
    assert after == [0, 1]
    assert ends == {0: 0, 1: 0}
    assert asyncio.run(partitions(settings, "no.such.topic.for.reading")) == []
    assert asyncio.run(end_offsets(settings, "no.such.topic.for.reading")) == {}


def test_a_reader_moves_between_topics_and_finds_one_created_after_its_first_read(settings: Settings) -> None:
    """Reading one topic narrows the consumer's metadata to it; a topic created afterwards is still
    found and read, and the first topic is still known."""
    first, second = settings.topics.canonical, settings.topics.dlq
    produce(settings, first, 3, partitions=1)

    async def main() -> tuple[list[int], list[int], list[int], dict[int, tuple[int, int]]]:
        async with TopicReader(settings) as reader:
            before = values(await reader.read(first, await reader.bounds(first)))
            producer = make_producer(settings)
            await ensure_topics(settings, [second], partitions=2)
            await producer.start()
            try:
                await producer.send_and_wait(second, b"5", partition=1)
            finally:
                await producer.stop()
            after = values(await reader.read(second, await reader.bounds(second)))
            return before, after, await reader.partitions(second, refresh="never"), await reader.bounds(first)

    before, after, known, bounds = asyncio.run(main())
    assert before == [0, 1, 2]
    assert after == [5]
    assert known == [0, 1]
    assert bounds == {0: (0, 3)}


def test_looking_up_a_missing_topic_does_not_create_it(settings: Settings) -> None:
    """The shared test broker creates topics named in a metadata request (auto.create.topics.enable):
    a lookup must not name the topic it is looking for."""
    missing = f"{settings.topics.canonical}.missing"

    async def main() -> tuple[list[int], dict[int, int], bool]:
        async with TopicReader(settings) as reader:
            found = await reader.partitions(missing, refresh="always")
            ends = await reader.end_offsets(missing)
        admin = make_admin(settings)
        await admin.start()
        try:
            return found, ends, missing in await admin.list_topics()
        finally:
            await admin.close()

    assert asyncio.run(main()) == ([], {}, False)


def test_offsets_at_a_time_are_the_first_record_at_or_after_it_else_the_end(settings: Settings) -> None:
    """Record i (partition i % 3, offset i // 3) has timestamp BASE_MS + 1000 * i."""
    topic = settings.topics.canonical
    produce(settings, topic, 12)
    assert asyncio.run(offsets_at(settings, topic, BASE_MS + 4000)) == {0: 2, 1: 1, 2: 1}  # records 6, 4, 5
    assert asyncio.run(offsets_at(settings, topic, BASE_MS + 4500)) == {0: 2, 1: 2, 2: 1}  # records 6, 7, 5
    assert asyncio.run(offsets_at(settings, topic, BASE_MS + 99_000)) == {0: 4, 1: 4, 2: 4}  # the ends
    assert asyncio.run(offsets_at(settings, topic, 0)) == {0: 0, 1: 0, 2: 0}


def test_newest_are_the_last_records_by_time_over_all_partitions_oldest_first(settings: Settings) -> None:
    topic = settings.topics.canonical
    produce(settings, topic, 20)

    async def body(reader: TopicReader) -> tuple[list[int], list[int], list[int]]:
        five = await reader.newest(topic, 5)
        everything = await reader.newest(topic, 100)
        return values(five), values(everything), values(await reader.newest(topic, 0))

    five, everything, none = run(settings, body)
    assert five == [15, 16, 17, 18, 19]
    assert everything == list(range(20))
    assert none == []


def test_newest_widens_its_window_past_records_that_hold_no_committed_value(settings: Settings) -> None:
    """Aborted transactions at a partition's end: the newest committed record is found further back."""
    topic = settings.topics.canonical

    async def main() -> list[int]:
        await ensure_topics(settings, [topic], partitions=1)
        producer = make_producer(settings, transactional_id=f"{topic}-newest-test")
        await producer.start()
        try:
            for value, commit in [(b"1", True), (b"2", True)] + [(b"0", False)] * 6:
                await producer.begin_transaction()
                await producer.send_and_wait(topic, value, partition=0)
                await (producer.commit_transaction() if commit else producer.abort_transaction())
        finally:
            await producer.stop()
        async with TopicReader(settings) as reader:
            return values(await reader.newest(topic, 2))

    assert asyncio.run(main()) == [1, 2]


def test_follow_yields_records_as_they_come_and_empty_fetches_between(settings: Settings) -> None:
    """From the end on: nothing (empty fetches, so the caller can stop), then what is written after."""
    topic = settings.topics.canonical
    produce(settings, topic, 3, partitions=1)

    async def main() -> tuple[int, list[int]]:
        async with TopicReader(settings) as reader:
            ends = await reader.end_offsets(topic)
            empty = 0
            seen: list[int] = []
            producer = make_producer(settings)
            await producer.start()
            try:
                fetches = reader.follow(topic, ends)
                async for records in fetches:
                    seen += values(records)
                    if not records:
                        empty += 1
                    if empty == 2 and not seen:
                        await producer.send_and_wait(topic, b"7", partition=0)
                    if seen or empty > 60:
                        break
                await fetches.aclose()
            finally:
                await producer.stop()
            return empty, seen

    empty, seen = asyncio.run(main())
    assert empty >= 2
    assert seen == [7]

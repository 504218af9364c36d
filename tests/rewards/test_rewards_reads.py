"""The dispatcher's agents notice a record Faust lost on its way to them and read it again (reads.py,
docs/decisions/0005). Offsets of the topics they read are contiguous, so a jump is a lost record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import ConsumerRecord
from faust.types import Message

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.rewards.dispatcher import Dispatcher
from pipeline.rewards.reads import ContiguousReads, RangeReader, faust_message

T = "deliveries"


def headers(record: Any) -> list[tuple[str, bytes]]:
    """A record's headers as (key, value) pairs, whichever form the reader gave them in."""
    if isinstance(record.headers, Mapping):
        return list(record.headers.items())
    return list(record.headers or [])


def verdicts(reads: ContiguousReads, offsets: list[int]) -> list[str]:
    return [reads.read(T, 0, offset) for offset in offsets]


def test_records_in_order_are_next_and_a_re_read_is_again() -> None:
    reads = ContiguousReads()
    reads.start(T, 0, 5)
    assert verdicts(reads, [5, 6, 7, 6, 7, 8]) == ["next", "next", "next", "again", "again", "next"]
    assert reads.expected(T, 0) == 9


def test_a_jump_is_a_gap_until_it_is_filled() -> None:
    """6 never arrives: 7 shows the gap and moves nothing; once 6 is read from Kafka, 7 is next."""
    reads = ContiguousReads()
    reads.start(T, 0, 5)
    assert verdicts(reads, [5, 7]) == ["next", "gap"]
    assert reads.expected(T, 0) == 6
    reads.filled(T, 0, 7)
    assert verdicts(reads, [7, 8]) == ["next", "next"]


def test_each_partition_and_topic_is_its_own() -> None:
    reads = ContiguousReads()
    reads.start(T, 0, 0)
    reads.start(T, 1, 10)
    reads.start("outbound", 0, 3)
    assert [reads.read(T, 1, 10), reads.read(T, 0, 1), reads.read("outbound", 0, 3)] == [
        "next",
        "gap",
        "next",
    ]


def test_a_partition_read_before_its_takeover_was_recorded_starts_where_it_is_read() -> None:
    reads = ContiguousReads()
    assert verdicts(reads, [40, 41]) == ["next", "next"]
    reads.forget()
    assert reads.expected(T, 0) is None


def test_the_range_reader_returns_the_missing_records_as_the_agent_would_have_seen_them(
    make_settings: Callable[..., Settings],
) -> None:
    """On the broker: offsets [1, 4) of a partition, in order, with their keys, values and headers."""
    settings = make_settings()
    topic = settings.topics.rewards_deliveries

    async def scenario() -> list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        await ensure_topics(settings, [topic])
        producer = make_producer(settings, linger_ms=0)
        await producer.start()
        try:
            for i in range(6):
                await producer.send_and_wait(
                    topic,
                    f"v{i}".encode(),
                    key=f"k{i}".encode(),
                    partition=1,
                    headers=[("hw-tenant", b"acme")],
                )
        finally:
            await producer.stop()
        reader = RangeReader(settings)
        try:
            found = await reader.read(topic, 1, 1, 4)
        finally:
            await reader.close()
        return [(m.offset, m.key, m.value, headers(m)) for m in found]

    assert asyncio.run(scenario()) == [
        (i, f"k{i}".encode(), f"v{i}".encode(), [("hw-tenant", b"acme")]) for i in (1, 2, 3)
    ]


def test_an_agent_meeting_a_jump_handles_the_missing_records_from_kafka_first(
    make_settings: Callable[..., Settings],
) -> None:
    """Offsets 1 to 3 never reached the agent: when 4 arrives they are read from the broker and handled
    in order before it; a late copy of 2 is handled again (idempotent), and nothing is handled twice
    otherwise."""
    settings = make_settings()
    dispatcher = Dispatcher(settings)
    topic = settings.topics.rewards_deliveries

    async def scenario() -> tuple[list[int], int | None]:
        await ensure_topics(settings, [topic])
        producer = make_producer(settings, linger_ms=0)
        await producer.start()
        try:
            for i in range(6):
                await producer.send_and_wait(topic, f"v{i}".encode(), partition=1)
        finally:
            await producer.stop()
        handled: list[int] = []

        async def handle(message: Message) -> None:
            assert message.value == f"v{message.offset}".encode()
            handled.append(message.offset)

        def arrived(offset: int) -> Message:
            return faust_message(
                ConsumerRecord(topic, 1, offset, 0, 0, None, f"v{offset}".encode(), None, 0, 0, [])
            )

        dispatcher.reads.start(topic, 1, 0)
        try:
            for offset in (0, 4, 2, 5):
                await dispatcher.handle_in_order(arrived(offset), handle)
        finally:
            await dispatcher.range_reader.close()
        return handled, dispatcher.reads.expected(topic, 1)

    assert asyncio.run(scenario()) == ([0, 1, 2, 3, 4, 2, 5], 6)

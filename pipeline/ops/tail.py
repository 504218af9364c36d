"""`headwater tail TOPIC`: the newest records of any topic as JSON lines, in the spirit of kcat (issue 13).

Reads committed records only (isolation_level=read_committed) and joins no consumer group, so it moves
nobody's offsets. Plain aiokafka: tailing never imports Faust.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.config import Settings, TopicSettings
from pipeline.errors import HeadwaterError
from pipeline.kafka.clients import broker_errors, make_consumer
from pipeline.sources import SOURCES

Write = Callable[[list[bytes]], None]
IDLE_POLLS = 10  # empty fetches in a row before a range counts as read (transaction markers hold no records)


@dataclass(frozen=True)
class TailOptions:
    """What to print: the newest `count` records, or from the beginning (at most `count` if given)."""

    topic: str
    count: int | None = 10
    follow: bool = False
    from_beginning: bool = False
    meta: bool = False


def resolve_topic(settings: Settings, name: str) -> str:
    """A topic as the shipped config names it (events.canonical, raw.segment, ...) -> this config's name for
    it; any other name is taken literally."""
    shipped = TopicSettings()
    for field in TopicSettings.model_fields:
        if field != "raw_prefix" and name == getattr(shipped, field):
            return str(getattr(settings.topics, field))
    source = name.removeprefix(shipped.raw_prefix)
    if source != name and source in SOURCES:
        return settings.topics.raw(source)
    return name


def json_value(value: bytes | None) -> bytes:
    """The record's value as one line of JSON: JSON bytes as stored (line breaks, which JSON allows only
    between tokens, become spaces), anything else as a JSON string; a tombstone is null."""
    if value is None:
        return b"null"
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return orjson.dumps(value.decode("utf-8", "replace"))
    return value.replace(b"\r", b" ").replace(b"\n", b" ").strip()


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace")


def render(record: ConsumerRecord[bytes, bytes], meta: bool) -> bytes:
    """One output line: the value, or with `meta` an object with the record's coordinates around it."""
    value = json_value(record.value)
    if not meta:
        return value
    when = datetime.fromtimestamp(record.timestamp / 1000, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps(
        {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": when.replace("+00:00", "Z"),
            "key": _text(record.key),
            "headers": {name: _text(raw) for name, raw in record.headers or ()},
            "value": orjson.Fragment(value),
        }
    )


def _newest_first_order(record: ConsumerRecord[bytes, bytes]) -> tuple[int, int, int]:
    return (record.timestamp, record.partition, record.offset)


async def _read_ranges(
    consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]], stop: asyncio.Event
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record in [start, end) of each partition (stopping early when `stop` is set)."""
    out: list[ConsumerRecord[bytes, bytes]] = []
    remaining: dict[TopicPartition, int] = {}
    for tp, (start, end) in ranges.items():
        if start < end:
            consumer.seek(tp, start)
            remaining[tp] = end
    consumer.pause(*[tp for tp in ranges if tp not in remaining])
    consumer.resume(*remaining)
    idle = 0
    while remaining and idle < IDLE_POLLS and not stop.is_set():
        batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=10_000)
        idle = 0 if batch else idle + 1
        for tp, records in batch.items():
            out += [r for r in records if r.offset < remaining.get(tp, -1)]
            if tp in remaining and await consumer.position(tp) >= remaining[tp]:
                del remaining[tp]
                consumer.pause(tp)
    return out


async def newest(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], count: int, stop: asyncio.Event
) -> list[ConsumerRecord[bytes, bytes]]:
    """The `count` newest committed records over all partitions, oldest first.

    Each partition is read back from its end, doubling the window until it holds `count` records or
    reaches the beginning (aborted records and transaction markers take offsets but hold no records).
    """
    if count <= 0:
        return []
    firsts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)  # the last stable offsets, under read_committed
    found: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
    window = {tp: count for tp in tps}
    pending = [tp for tp in tps if firsts[tp] < ends[tp]]
    while pending and not stop.is_set():
        ranges = {tp: (max(firsts[tp], ends[tp] - window[tp]), ends[tp]) for tp in pending}
        records = await _read_ranges(consumer, ranges, stop)
        for tp in pending:
            found[tp] = [r for r in records if r.partition == tp.partition]
        pending = [tp for tp in pending if len(found[tp]) < count and ranges[tp][0] > firsts[tp]]
        for tp in pending:
            window[tp] *= 2
    merged = sorted((r for records in found.values() for r in records), key=_newest_first_order)
    return merged[-count:]


async def _stream(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    write: Write,
    stop: asyncio.Event,
    meta: bool,
    budget: int | None,
    until_end: bool,
) -> None:
    """Print records in fetch order (each partition in offset order) until `budget` records are out, `stop`
    is set, or with `until_end` the end offsets of the start are reached."""
    ends = await consumer.end_offsets(tps) if until_end else {}
    remaining = set(tps)
    for tp in tps if until_end else ():
        if await consumer.position(tp) >= ends[tp]:
            remaining.discard(tp)
    consumer.resume(*tps)
    idle = 0
    while remaining and not stop.is_set() and (budget is None or budget > 0):
        batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=1_000)
        idle = 0 if batch else idle + 1
        lines: list[bytes] = []
        for tp, records in batch.items():
            for record in records:
                if until_end and record.offset >= ends[tp]:
                    break
                if budget is not None and len(lines) >= budget:
                    break
                lines.append(render(record, meta))
            if until_end and await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)
                consumer.pause(tp)
        if lines:
            write(lines)
        if budget is not None:
            budget -= len(lines)
        if until_end and idle >= IDLE_POLLS:
            return


async def _partitions(consumer: AIOKafkaConsumer, topic: str, bootstrap: str) -> list[TopicPartition]:
    await consumer._client.force_metadata_update()
    parts = sorted(consumer.partitions_for_topic(topic) or ())
    if not parts:
        raise HeadwaterError(f"no topic {topic!r} on {bootstrap}")
    return [TopicPartition(topic, p) for p in parts]


async def tail(settings: Settings, options: TailOptions, write: Write, stop: asyncio.Event) -> None:
    """Print what `options` asks for through `write` (a list of lines at a time), then return, or with
    `follow` keep printing new records until `stop` is set."""
    topic = resolve_topic(settings, options.topic)
    consumer = make_consumer(settings, isolation_level="read_committed", auto_offset_reset="latest")
    async with broker_errors(f"reading {topic}", access=settings.kafka):
        try:
            await consumer.start()  # inside the try: a failed start must still close the consumer
            tps = await _partitions(consumer, topic, settings.kafka.bootstrap_servers)
            consumer.assign(tps)
            if options.from_beginning:
                firsts = await consumer.beginning_offsets(tps)
                for tp in tps:
                    consumer.seek(tp, firsts[tp])
                until_end = not options.follow
                await _stream(consumer, tps, write, stop, options.meta, options.count, until_end)
                return
            count = 10 if options.count is None else options.count
            records = await newest(consumer, tps, count, stop)
            if records:
                write([render(r, options.meta) for r in records])
            if options.follow:
                ends = await consumer.end_offsets(tps)
                for tp in tps:
                    consumer.seek(tp, ends[tp])
                await _stream(consumer, tps, write, stop, options.meta, None, until_end=False)
        finally:
            await consumer.stop()

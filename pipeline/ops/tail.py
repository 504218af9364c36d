"""`headwater tail TOPIC`: the newest records of any topic as JSON lines, in the spirit of kcat.

Reads committed records only and joins no consumer group, so it moves nobody's offsets (it reads through
pipeline.kafka.reading). Plain aiokafka: tailing never imports Faust.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiokafka import ConsumerRecord

from pipeline.config import Settings, TopicSettings
from pipeline.errors import HeadwaterError
from pipeline.kafka.reading import Record, TopicReader
from pipeline.sources import SOURCES

Write = Callable[[list[bytes]], None]


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


async def _print(
    fetches: AsyncGenerator[list[Record], None],
    write: Write,
    stop: asyncio.Event,
    meta: bool,
    budget: int | None,
) -> None:
    """Print records in fetch order (each partition in offset order) until the fetches end, `budget`
    records are out, or `stop` is set."""
    async with contextlib.aclosing(fetches):
        async for records in fetches:
            if budget is not None:
                records = records[:budget]
                budget -= len(records)
            if records:
                write([render(r, meta) for r in records])
            if stop.is_set() or budget == 0:
                return


async def tail(settings: Settings, options: TailOptions, write: Write, stop: asyncio.Event) -> None:
    """Print what `options` asks for through `write` (a list of lines at a time), then return, or with
    `follow` keep printing new records until `stop` is set."""
    topic = resolve_topic(settings, options.topic)
    async with TopicReader(settings) as reader:
        bounds = await reader.bounds(topic)
        if not bounds:
            raise HeadwaterError(f"no topic {topic!r} on {settings.kafka.bootstrap_servers}")
        if options.from_beginning:
            firsts = {p: first for p, (first, _) in bounds.items()}
            fetches = (
                reader.follow(topic, firsts)
                if options.follow
                else reader.chunks(topic, bounds, max_records=1_000, stop=stop)
            )
            await _print(fetches, write, stop, options.meta, options.count)
            return
        count = 10 if options.count is None else options.count
        records = await reader.newest(topic, count, stop, bounds)
        if records:
            write([render(r, options.meta) for r in records])
        if options.follow and not stop.is_set():
            ends = {p: end for p, (_, end) in bounds.items()}  # where the newest ended: no gap, no repeat
            await _print(reader.follow(topic, ends), write, stop, options.meta, None)

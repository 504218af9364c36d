"""Reading Kafka outside the stage loops: one reader for ranges, partitions, offsets at a time and tails.

Every tool that reads a topic (tail, replay, the dead-letter tools, the dedup and reward-state restores,
the test rigs) goes through `TopicReader`, so the stop rule of a range read, the metadata refresh that
finds a topic created a moment ago and the handling of transaction markers live here once, and aiokafka's
private attributes are touched nowhere else. The stage loops consume with their own consumers
(pipeline/stream/, pipeline/rewards/): they are not readers of a range.

The contract, for every method:
- A reader joins no consumer group and commits nothing: reading never moves anyone's committed offsets.
- Its consumer is built by `clients.make_consumer`, so the client settings (security included) apply.
- Under the default `read_committed` a reader sees committed records only; end offsets are then the last
  stable offsets. Aborted records and transaction markers take offsets but hold no records, so a range
  may hold fewer records than offsets, and offsets are not contiguous.
- A range is `partition -> (first, end)`: the records with first <= offset < end. A first offset below
  the partition's beginning (records deleted by retention) reads from the beginning.
- A range read stops when the consumer's position in every partition has reached its end (the position
  passes markers and aborted records too). It also stops after `idle_fetches` empty fetches in a row
  (about half a second each), so an end that is never reached (an open transaction, a broker gone) ends
  the read instead of hanging it; `unfinished` then tells which partitions were cut short. With
  `idle_fetches=None` it waits until every end is reached.
- Kafka failures surface as `BrokerUnavailable`, refused credentials as `KafkaAccessRefused`
  (clients.broker_errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.config import Settings
from pipeline.kafka.clients import broker_errors, make_consumer

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Ranges: TypeAlias = Mapping[int, tuple[int, int]]
"""partition -> (first offset, end offset): the records with first <= offset < end."""
Refresh: TypeAlias = Literal["if_unknown", "always", "never"]

FETCH_TIMEOUT_MS = 500
IDLE_FETCHES = 10
"""Empty fetches in a row after which a range read gives up on the ends it has not reached."""


class TopicReader:
    """One consumer, in no group, for reading topics; use as `async with TopicReader(settings) as reader`.

    A reader may be kept open and reused (the dead-letter page does): each read assigns the consumer the
    partitions it reads. One read at a time per reader.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed",
        **overrides: Any,
    ) -> None:
        self.settings = settings
        self.consumer: AIOKafkaConsumer = make_consumer(
            settings,
            group_id=None,
            isolation_level=isolation_level,
            auto_offset_reset="earliest",
            **overrides,
        )
        self.unfinished: dict[int, tuple[int, int]] = {}
        """After a range read: partition -> (position, end) of each partition whose end was not reached."""
        self._topics: set[str] = set()  # the existing topics this reader has looked up

    def _errors(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        return broker_errors(what, access=self.settings.kafka)

    async def start(self) -> None:
        """Connect (`async with` does it; a long-lived reader calls start and stop itself)."""
        async with self._errors(f"connecting to Kafka at {self.settings.kafka.bootstrap_servers}"):
            try:
                await self.consumer.start()
            except BaseException:
                await self.consumer.stop()  # a failed start must still close the connections it opened
                raise

    async def stop(self) -> None:
        await self.consumer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- what a topic holds ----------------------------------------------------------------------------

    async def partitions(self, topic: str, refresh: Refresh = "if_unknown") -> list[int]:
        """The topic's partition numbers, sorted; empty when the topic does not exist.

        The metadata is read again first when the topic is unknown to the reader (`if_unknown`: a topic
        created after the reader started is found), before every answer (`always`: partitions added since
        are found too), or never (`never`: for callers that throttle refreshes themselves). Looking a topic
        up never creates it (the lookup asks for every topic's metadata, naming none: a request naming a
        missing topic creates it on a broker with auto.create.topics.enable).
        """
        client = self.consumer._client
        parts = self.consumer.partitions_for_topic(topic)
        async with self._errors(f"reading the metadata of {topic}"):
            if refresh == "always" or (refresh == "if_unknown" and not parts):
                parts = (await client.fetch_all_metadata()).partitions_for_topic(topic)
            if parts and topic not in self._topics:
                self._topics.add(topic)
                await client.add_topic(
                    topic
                )  # the consumer's metadata keeps it from now on (leaders, offsets)
        return sorted(parts or ())

    def _assign(self, tps: list[TopicPartition]) -> None:
        """Assign the consumer `tps`. An assignment narrows the consumer's metadata to the assigned topics;
        every topic this reader has used stays in it, so a reader can move between topics."""
        self.consumer.assign(tps)
        self.consumer._client.set_topics(sorted(self._topics | {tp.topic for tp in tps}))

    async def _known(self, topic: str, partitions: Iterable[int] | None) -> list[TopicPartition]:
        known = await self.partitions(topic)
        parts = known if partitions is None else sorted(partitions)
        return [TopicPartition(topic, p) for p in parts]

    async def end_offsets(self, topic: str, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """partition -> end offset (the offset the next record will get; under read_committed the last
        stable offset). Every partition of the topic unless `partitions` is given."""
        tps = await self._known(topic, partitions)
        if not tps:
            return {}
        async with self._errors(f"reading the offsets of {topic}"):
            ends = await self.consumer.end_offsets(tps)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def bounds(self, topic: str, partitions: Iterable[int] | None = None) -> dict[int, tuple[int, int]]:
        """partition -> (beginning offset, end offset): everything the topic holds now, as ranges."""
        tps = await self._known(topic, partitions)
        if not tps:
            return {}
        async with self._errors(f"reading the offsets of {topic}"):
            firsts = await self.consumer.beginning_offsets(tps)
            ends = await self.consumer.end_offsets(tps)
        return {tp.partition: (firsts[tp], ends[tp]) for tp in tps}

    async def offsets_at(
        self, topic: str, timestamp_ms: int, partitions: Iterable[int] | None = None
    ) -> dict[int, int]:
        """partition -> the first offset whose record's timestamp is at or after `timestamp_ms`, or the end
        offset where there is none (so `(offsets_at(t1), offsets_at(t2))` is the range [t1, t2))."""
        tps = await self._known(topic, partitions)
        if not tps:
            return {}
        async with self._errors(f"reading the offsets of {topic}"):
            ends = await self.consumer.end_offsets(tps)
            found = await self.consumer.offsets_for_times({tp: max(0, timestamp_ms) for tp in tps})
        return {tp.partition: (hit.offset if (hit := found.get(tp)) else ends[tp]) for tp in tps}

    # --- reading ranges --------------------------------------------------------------------------------

    async def chunks(
        self,
        topic: str,
        ranges: Ranges,
        *,
        max_records: int = 10_000,
        idle_fetches: int | None = IDLE_FETCHES,
        stop: asyncio.Event | None = None,
    ) -> AsyncGenerator[list[Record], None]:
        """The records of the ranges, one fetch at a time (at most `max_records`; each partition's records
        in offset order, partitions interleaved), until every end is reached (see the module's contract),
        or `stop` is set. Empty ranges are skipped; nothing is yielded empty."""
        self.unfinished = {}
        wanted = {TopicPartition(topic, p): end for p, (first, end) in ranges.items() if end > first}
        if not wanted:
            return
        consumer = self.consumer
        async with self._errors(f"reading {topic}"):
            self._assign(list(wanted))
            for tp in wanted:
                consumer.seek(tp, ranges[tp.partition][0])
            idle = 0
            while wanted and not (stop is not None and stop.is_set()):
                batch = await consumer.getmany(*wanted, timeout_ms=FETCH_TIMEOUT_MS, max_records=max_records)
                out: list[Record] = []
                for tp, records in batch.items():
                    end = wanted.get(tp, -1)
                    if records and records[-1].offset < end:
                        out += records
                    else:
                        out += [r for r in records if r.offset < end]
                for tp in list(wanted):
                    if await consumer.position(tp) >= wanted[tp]:
                        del wanted[tp]
                        consumer.pause(tp)
                if out:
                    idle = 0
                    yield out
                else:
                    idle += 1
                    if idle_fetches is not None and idle >= idle_fetches and wanted:
                        break
            for tp, end in wanted.items():
                self.unfinished[tp.partition] = (await consumer.position(tp), end)
        if self.unfinished and not (stop is not None and stop.is_set()):
            log.info("reading %s: stopped before the end in %s (position, end)", topic, self.unfinished)

    async def read(
        self,
        topic: str,
        ranges: Ranges,
        *,
        max_records: int = 10_000,
        idle_fetches: int | None = IDLE_FETCHES,
        stop: asyncio.Event | None = None,
    ) -> list[Record]:
        """Every record of the ranges, partition by partition, each in offset order (`max_records` per
        fetch)."""
        found: dict[int, list[Record]] = {p: [] for p in sorted(ranges)}
        chunks = self.chunks(topic, ranges, max_records=max_records, idle_fetches=idle_fetches, stop=stop)
        async for records in chunks:
            for record in records:
                found[record.partition].append(record)
        return [record for records in found.values() for record in records]

    async def newest(
        self, topic: str, count: int, stop: asyncio.Event | None = None, bounds: Ranges | None = None
    ) -> list[Record]:
        """The `count` newest records over all partitions before the ends of `bounds` (default: the
        topic's `bounds()` now), oldest first (by timestamp, then partition and offset).

        Each partition is read back from its end, the window doubling until it holds `count` records or
        reaches the beginning (markers and aborted records take offsets but hold no records).
        """
        if count <= 0:
            return []
        bounds = bounds if bounds is not None else await self.bounds(topic)
        window = dict.fromkeys(bounds, count)
        found: dict[int, list[Record]] = {}
        pending = [p for p, (first, end) in bounds.items() if first < end]
        while pending and not (stop is not None and stop.is_set()):
            ranges = {p: (max(bounds[p][0], bounds[p][1] - window[p]), bounds[p][1]) for p in pending}
            records = await self.read(topic, ranges, idle_fetches=None, stop=stop)
            for p in pending:
                found[p] = [r for r in records if r.partition == p]
            pending = [p for p in pending if len(found[p]) < count and ranges[p][0] > bounds[p][0]]
            for p in pending:
                window[p] *= 2
        merged = sorted(
            (r for records in found.values() for r in records),
            key=lambda r: (r.timestamp, r.partition, r.offset),
        )
        return merged[-count:]

    async def follow(
        self, topic: str, start: Mapping[int, int], *, max_records: int = 1_000
    ) -> AsyncGenerator[list[Record], None]:
        """Records from `start` (partition -> offset) on, as they come, one fetch at a time, for as long as
        the caller iterates. A fetch that finds nothing yields an empty list (about every half second), so
        the caller can check a deadline or a stop signal between fetches."""
        tps = [TopicPartition(topic, p) for p in sorted(start)]
        async with self._errors(f"reading {topic}"):
            self._assign(tps)
            for tp in tps:
                self.consumer.seek(tp, start[tp.partition])
            while True:
                batch = await self.consumer.getmany(
                    *tps, timeout_ms=FETCH_TIMEOUT_MS, max_records=max_records
                )
                yield [record for records in batch.values() for record in records]


# --- one-shot helpers: a reader for one answer -------------------------------------------------------------


async def partitions(settings: Settings, topic: str) -> list[int]:
    """The topic's partition numbers (empty when it does not exist)."""
    async with TopicReader(settings) as reader:
        return await reader.partitions(topic)


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """partition -> end offset of a topic (empty when the topic does not exist)."""
    async with TopicReader(settings) as reader:
        return await reader.end_offsets(topic)


async def offsets_at(settings: Settings, topic: str, timestamp_ms: int) -> dict[int, int]:
    """partition -> first offset with a timestamp at or after `timestamp_ms`, else the end offset (empty
    when the topic does not exist)."""
    async with TopicReader(settings) as reader:
        return await reader.offsets_at(topic, timestamp_ms)


async def read_topic(
    settings: Settings,
    topic: str,
    start: Mapping[int, int] | None = None,
    end: Mapping[int, int] | None = None,
) -> list[Record]:
    """Every record of `topic` from `start` (default: the beginning) up to `end` (default: the current
    end), partition by partition, each in offset order (empty when the topic does not exist)."""
    async with TopicReader(settings, max_partition_fetch_bytes=16 * 1024 * 1024) as reader:
        bounds = await reader.bounds(topic)
        ranges = {
            p: (max(first, (start or {}).get(p, 0)), (end or {}).get(p, last))
            for p, (first, last) in bounds.items()
        }
        return await reader.read(topic, ranges)

"""Bounded reads of events.dlq for the DLQ page (issue 12): a time window, a limit, a scan cap.

    read_window(settings, filters, limit, scan_limit) -> Window    the newest matches, read backwards
    read_letter(settings, at) -> (DeadLetter | None, Redrive | None)  one record, by its DLQ coordinates

Unlike pipeline.ops.dlq.read_snapshot (the CLI's whole-topic read), no request here reads more than
`scan_limit` records, however large the topic: each partition is read backwards in chunks from the end
(or from `until`) towards the first offset of the window, and stops once it holds `limit` matches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pipeline.config import Settings
from pipeline.kafka.clients import broker_errors, make_consumer
from pipeline.ops import dlq
from pipeline.records import DeadLetter

FIRST_CHUNK = 64  # records per partition in the first backward step; each further step doubles it
MAX_CHUNK = 4096
IDLE_POLLS = 3  # empty fetches in a row before a range counts as read (transaction markers, compaction)


@dataclass(frozen=True)
class At:
    """Where a dead letter sits on events.dlq; detail links carry it, so a lookup reads one record."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}-{self.offset}"

    @classmethod
    def parse(cls, text: str) -> At | None:
        partition, _, offset = text.partition("-")
        if not (partition.isdigit() and offset.isdigit() and len(partition) < 6 and len(offset) < 19):
            return None
        return cls(int(partition), int(offset))


@dataclass
class Window:
    """What one list request read: the matches newest first (with their coordinates), and how far it got."""

    letters: list[tuple[DeadLetter, At]] = field(default_factory=list)
    redrives: dict[str, dlq.Redrive] = field(default_factory=dict)
    scanned: int = 0
    complete: bool = True  # False: the scan cap stopped the read before the window's start
    elapsed_s: float = 0.0


async def read_window(
    settings: Settings, filters: dlq.Filters, limit: int, scan_limit: int, letter_id: str | None = None
) -> Window:
    """The newest `limit` dead letters matching `filters` (whose `since` bounds the read), at most
    `scan_limit` records read in all; `letter_id` narrows it to one id (a link without coordinates)."""
    started = time.monotonic()
    window = Window()
    consumer = make_consumer(settings, max_partition_fetch_bytes=4 * 1024 * 1024)
    async with broker_errors(f"reading {settings.topics.dlq}"):
        await consumer.start()
        try:
            window.redrives = await _redrives(consumer, settings, filters.since, scan_limit)
            budget = max(0, scan_limit - len(window.redrives))
            ranges = await _ranges(consumer, settings.topics.dlq, filters.since, filters.until)
            found: dict[int, list[tuple[DeadLetter, At]]] = {tp.partition: [] for tp in ranges}
            chunk = FIRST_CHUNK
            while ranges and budget > 0:
                step = {}
                for tp, (low, high) in ranges.items():
                    size = max(1, min(chunk, budget // len(ranges)))
                    step[tp] = (max(low, high - size), high)
                records = await _fetch(consumer, step)
                for tp, batch in records.items():
                    window.scanned += len(batch)
                    budget -= len(batch)
                    matches = [
                        m for r in reversed(batch) if (m := _match(r, filters, window.redrives, letter_id))
                    ]
                    found[tp.partition].extend(matches)
                ranges = {
                    tp: (low, step[tp][0])
                    for tp, (low, _) in ranges.items()
                    if step[tp][0] > low and len(found[tp.partition]) < limit
                }
                chunk = min(chunk * 2, MAX_CHUNK)
            window.complete = not ranges
            newest: dict[str, tuple[DeadLetter, At]] = {}  # a record processed twice: two letters, one id
            for matches in found.values():
                for match in matches[:limit]:
                    newest.setdefault(match[0].id, match)
            merged = sorted(newest.values(), key=lambda m: m[0].failed_at, reverse=True)
            window.letters = merged[:limit]
        finally:
            await consumer.stop()
    window.elapsed_s = time.monotonic() - started
    return window


async def read_letter(settings: Settings, at: At) -> tuple[DeadLetter | None, dlq.Redrive | None]:
    """The dead letter stored at `at` (None if there is none), and its redrive if one is logged after it."""
    consumer = make_consumer(settings, max_partition_fetch_bytes=4 * 1024 * 1024)
    async with broker_errors(f"reading {settings.topics.dlq}"):
        await consumer.start()
        try:
            tp = TopicPartition(settings.topics.dlq, at.partition)
            if at.partition not in (await _partitions(consumer, tp.topic)):
                return None, None
            records = await _fetch(consumer, {tp: (at.offset, at.offset + 1)})
            record = next((r for r in records.get(tp, []) if r.offset == at.offset), None)
            letter = _letter(record) if record is not None else None
            if letter is None:
                return None, None
            redrives = await _redrives(consumer, settings, letter.failed_at, settings.dlq.page_scan_limit)
            return letter, redrives.get(letter.id)
        finally:
            await consumer.stop()


# --- reading ranges ------------------------------------------------------------------------------------


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    parts = consumer.partitions_for_topic(topic)
    if not parts:  # as pipeline.kafka.clients does: the topic may be new to this consumer's metadata
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    return sorted(parts or ())


async def _ranges(
    consumer: AIOKafkaConsumer, topic: str, since: datetime | None, until: datetime | None
) -> dict[TopicPartition, tuple[int, int]]:
    """Partition -> [first offset at or after `since`, first offset at or after `until` (else the end))."""
    tps = [TopicPartition(topic, p) for p in await _partitions(consumer, topic)]
    if not tps:
        return {}
    ends = await consumer.end_offsets(tps)
    starts = await consumer.beginning_offsets(tps)
    lows, highs = dict(starts), dict(ends)
    if since is not None:  # a dead letter is written after it failed: its record is never older
        found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        lows = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
    if until is not None:  # ...but may be written a little later: stop a minute past `until`
        found = await consumer.offsets_for_times({tp: int(until.timestamp() * 1000) + 60_000 for tp in tps})
        highs = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
    return {tp: (max(lows[tp], starts[tp]), highs[tp]) for tp in tps if highs[tp] > max(lows[tp], starts[tp])}


async def _fetch(
    consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]]
) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """The records of each [low, high) range, in offset order (the consumer is reassigned to them)."""
    out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {tp: [] for tp in ranges}
    wanted = {tp: rng for tp, rng in ranges.items() if rng[1] > rng[0]}
    if not wanted:
        return out
    consumer.assign(list(wanted))
    for tp, (low, _) in wanted.items():
        consumer.seek(tp, low)
    idle = 0
    while wanted and idle < IDLE_POLLS:
        batch = await consumer.getmany(*wanted, timeout_ms=500, max_records=MAX_CHUNK)
        idle = 0 if batch else idle + 1
        for tp, records in batch.items():
            high = wanted[tp][1] if tp in wanted else -1
            out[tp].extend(r for r in records if r.offset < high)
        for tp in list(wanted):
            if await consumer.position(tp) >= wanted[tp][1]:
                del wanted[tp]
                consumer.pause(tp)
    return out


async def _redrives(
    consumer: AIOKafkaConsumer, settings: Settings, since: datetime | None, scan_limit: int
) -> dict[str, dlq.Redrive]:
    """Redrives logged at or after `since` (a redrive follows its dead letter), at most `scan_limit` read."""
    ranges = await _ranges(consumer, dlq.redrive_log_topic(settings), since, None)
    ranges = {tp: (low, min(high, low + scan_limit)) for tp, (low, high) in ranges.items()}
    redrives: dict[str, dlq.Redrive] = {}
    for records in (await _fetch(consumer, ranges)).values():
        for record in records:
            try:
                entry = dlq.Redrive.model_validate_json(record.value or b"")
            except ValueError:
                continue
            redrives[entry.id] = entry
    return redrives


# --- matching -------------------------------------------------------------------------------------------


def _match(
    record: ConsumerRecord[bytes, bytes],
    filters: dlq.Filters,
    redrives: dict[str, dlq.Redrive],
    letter_id: str | None,
) -> tuple[DeadLetter, At] | None:
    """The record as a dead letter with its coordinates, if it matches (a cheap pre-check on the JSON)."""
    try:
        doc = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not _might_match(doc, filters):
        return None
    if letter_id is not None and doc.get("id") != letter_id:
        return None
    letter = _letter(record)
    if letter is None or not filters.matches(letter, letter.id in redrives):
        return None
    return letter, At(record.partition, record.offset)


def _might_match(doc: dict[str, object], filters: dlq.Filters) -> bool:
    reason = doc.get("reason")
    return (
        (filters.source is None or doc.get("source") == filters.source)
        and (filters.tenant is None or doc.get("tenant") == filters.tenant)
        and (filters.stage is None or doc.get("stage") == filters.stage)
        and (
            filters.reason is None
            or (isinstance(reason, str) and filters.reason in (reason, reason.partition(":")[0]))
        )
    )


def _letter(record: ConsumerRecord[bytes, bytes]) -> DeadLetter | None:
    try:
        return DeadLetter.from_json(record.value or b"")
    except ValueError:
        return None

"""Bounded reads of events.dlq for the DLQ page: a time window, a limit, a scan cap.

    DlqReader(settings).window(filters, limit, scan_limit) -> Window   the newest matches, read backwards
    DlqReader(settings).letter(at) -> (DeadLetter | None, Redrive)     one record, by its DLQ coordinates

Unlike pipeline.ops.dlq.read_snapshot (the CLI's whole-topic read), no request here reads more than
`scan_limit` records, however large the topic: each partition is read backwards in chunks from the end
(or from `until`) towards the first offset of the window, and stops once it holds `limit` matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import orjson
from aiokafka import ConsumerRecord

from pipeline.config import Settings
from pipeline.errors import HeadwaterError
from pipeline.kafka.clients import broker_errors
from pipeline.kafka.reading import TopicReader
from pipeline.ops import dlq
from pipeline.records import DeadLetter

log = logging.getLogger(__name__)
FIRST_CHUNK = 64  # records per partition in the first backward step; each further step doubles it
MAX_CHUNK = 4096
METADATA_EVERY_S = 5.0  # an unknown topic (no redrive yet) is looked up again at most this often
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


class DlqReader:
    """One long-lived consumer (no group) for the page's requests, one request at a time.

    Starting a consumer and learning the topics' metadata is most of a small read's cost, so both are
    paid once; a broker failure drops the consumer and the next request starts a new one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.reader: TopicReader | None = None
        self.lock = asyncio.Lock()
        self.metadata_at = 0.0

    async def warm(self) -> None:
        """Start the consumer and learn the DLQ topic's partitions now, so the first request is quick."""
        try:
            async with self._session() as reader:
                await self._ranges(reader, self.settings.topics.dlq, None, None)
        except HeadwaterError as exc:  # Kafka not there yet: the first request tries again
            log.warning("DLQ page: %s", exc)

    async def stop(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            await reader.stop()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[TopicReader]:
        async with (
            self.lock,
            broker_errors(f"reading {self.settings.topics.dlq}", access=self.settings.kafka),
        ):
            try:
                if self.reader is None:
                    reader = TopicReader(  # short long-polls: a read at the end must not wait
                        self.settings, max_partition_fetch_bytes=1024 * 1024, fetch_max_wait_ms=20
                    )
                    await reader.start()
                    self.reader = reader
                yield self.reader
            except BaseException:
                await self.stop()
                raise

    async def window(
        self, filters: dlq.Filters, limit: int, scan_limit: int, letter_id: str | None = None
    ) -> Window:
        """The newest `limit` dead letters matching `filters` (whose `since` bounds the read), at most
        `scan_limit` records read in all; `letter_id` narrows it to one id (a link without coordinates)."""
        started = time.monotonic()
        window = Window()
        topic = self.settings.topics.dlq
        async with self._session() as reader:
            window.redrives = await self._redrives(reader, filters.since, scan_limit)
            budget = max(0, scan_limit - len(window.redrives))
            ranges = await self._ranges(reader, topic, filters.since, filters.until)
            found: dict[int, list[tuple[DeadLetter, At]]] = {p: [] for p in ranges}
            chunk = max(FIRST_CHUNK, limit)  # one step when the newest records match
            while ranges and budget > 0:
                step = {}
                for p, (low, high) in ranges.items():
                    size = max(1, min(chunk, budget // len(ranges)))
                    step[p] = (max(low, high - size), high)
                records = await reader.read(topic, step, max_records=MAX_CHUNK, idle_fetches=IDLE_POLLS)
                window.scanned += len(records)
                budget -= len(records)
                found_now = [
                    m for r in reversed(records) if (m := _match(r, filters, window.redrives, letter_id))
                ]
                for match in found_now:
                    found[match[1].partition].append(match)
                ranges = {
                    p: (low, step[p][0])
                    for p, (low, _) in ranges.items()
                    if step[p][0] > low and len(found[p]) < limit
                }
                chunk = min(chunk * 2, MAX_CHUNK)
            window.complete = not ranges
        newest: dict[str, tuple[DeadLetter, At]] = {}  # a record processed twice: two letters, one id
        for matches in found.values():
            for match in matches[:limit]:
                newest.setdefault(match[0].id, match)
        window.letters = sorted(newest.values(), key=lambda m: m[0].failed_at, reverse=True)[:limit]
        window.elapsed_s = time.monotonic() - started
        return window

    async def letter(self, at: At) -> tuple[DeadLetter | None, dlq.Redrive | None]:
        """The dead letter stored at `at` (None if there is none), and its redrive if one is logged."""
        topic = self.settings.topics.dlq
        async with self._session() as reader:
            if at.partition not in await self._partitions(reader, topic):
                return None, None
            records = await reader.read(
                topic, {at.partition: (at.offset, at.offset + 1)}, idle_fetches=IDLE_POLLS
            )
            record = next((r for r in records if r.offset == at.offset), None)
            letter = _letter(record) if record is not None else None
            if letter is None:
                return None, None
            redrives = await self._redrives(reader, letter.failed_at, self.settings.dlq.page_scan_limit)
            return letter, redrives.get(letter.id)

    async def _partitions(self, reader: TopicReader, topic: str) -> list[int]:
        """The topic's partitions. An unknown DLQ topic refreshes the metadata on every request; an unknown
        redrive log (no redrive yet) at most every few seconds, so it does not tax every list."""
        throttled = topic != self.settings.topics.dlq
        if throttled and time.monotonic() - self.metadata_at <= METADATA_EVERY_S:
            return await reader.partitions(topic, refresh="never")
        parts = await reader.partitions(topic, refresh="never")
        if not parts:
            self.metadata_at = time.monotonic()
            parts = await reader.partitions(topic, refresh="if_unknown")
        return parts

    async def _ranges(
        self, reader: TopicReader, topic: str, since: datetime | None, until: datetime | None
    ) -> dict[int, tuple[int, int]]:
        """Partition -> [first offset at or after `since`, first at or after `until` (else the end))."""
        parts = await self._partitions(reader, topic)
        if not parts:
            return {}
        if since is None:
            lows = {p: first for p, (first, _) in (await reader.bounds(topic, parts)).items()}
        else:  # a dead letter is written after it failed: its record is never older
            lows = await reader.offsets_at(topic, _ms(since), parts)
        if until is None:
            highs = await reader.end_offsets(topic, parts)
        else:  # ...but may be written a little later: stop a minute past `until`
            highs = await reader.offsets_at(topic, _ms(until + timedelta(minutes=1)), parts)
        return {p: (lows[p], highs[p]) for p in parts if highs[p] > lows[p]}

    async def _redrives(
        self, reader: TopicReader, since: datetime | None, scan_limit: int
    ) -> dict[str, dlq.Redrive]:
        """Redrives logged at or after `since` (a redrive follows its letter), at most `scan_limit` read."""
        topic = dlq.redrive_log_topic(self.settings)
        ranges = await self._ranges(reader, topic, since, None)
        ranges = {p: (low, min(high, low + scan_limit)) for p, (low, high) in ranges.items()}
        redrives: dict[str, dlq.Redrive] = {}
        for record in await reader.read(topic, ranges, max_records=MAX_CHUNK, idle_fetches=IDLE_POLLS):
            try:
                entry = dlq.Redrive.model_validate_json(record.value or b"")
            except ValueError:
                continue
            redrives[entry.id] = entry
        return redrives


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


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

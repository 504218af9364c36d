"""Reads of the dedup changelog's partitions, read_committed, up to their end as of the call: what a
restore and a re-sync after a failed transaction need, and nothing else (through pipeline.kafka.reading).

A transaction of this worker that failed ambiguously (its commit may have gone through) leaves the last
stable offset below the high watermark until the coordinator has written its markers; `settled_ends`
waits for that, so a re-sync reads whatever that transaction committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from pipeline.config import Settings
from pipeline.kafka.reading import TopicReader

# (key, value) of a changelog record.
ChangelogRecord = tuple[bytes | None, bytes | None]


class ChangelogReader:
    """A read_committed reader of changelog partitions; `async with` starts and stops it."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.reader = TopicReader(settings, isolation_level="read_committed")

    async def __aenter__(self) -> ChangelogReader:
        await self.reader.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.reader.stop()

    async def bounds(self, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Per partition: its first offset (retention deleted what is before) and its last stable offset."""
        return await self.reader.bounds(self.topic, partitions)

    async def settled_ends(self, partitions: Iterable[int], timeout_s: float = 60.0) -> dict[int, int]:
        """The partitions' ends once no transaction is open on them (last stable offset = high watermark)."""
        wanted = sorted(partitions)
        async with TopicReader(self.settings, isolation_level="read_uncommitted") as probe:
            deadline = time.monotonic() + timeout_s
            while True:
                stable = await self.reader.end_offsets(self.topic, wanted)
                high = await probe.end_offsets(self.topic, wanted)
                if all(stable[p] >= high[p] for p in wanted):
                    return stable
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a transaction stayed open on {self.topic} for {timeout_s:.0f}s")
                await asyncio.sleep(0.2)  # the coordinator is writing the markers of a finished transaction

    async def read(self, positions: dict[int, int], ends: dict[int, int]) -> dict[int, list[ChangelogRecord]]:
        """The records of each partition from its position up to (not including) its end, in offset order.
        Every end is reached (no give-up on idle fetches): a restore must read every record."""
        held: dict[int, list[ChangelogRecord]] = {p: [] for p in positions}
        ranges = {p: (positions[p], ends[p]) for p in positions}
        async for records in self.reader.chunks(self.topic, ranges, max_records=50_000, idle_fetches=None):
            for record in records:
                held[record.partition].append((record.key, record.value))
        return held

"""Reads of the dedup changelog's partitions, read_committed, up to their end as of the call: what a
restore and a re-sync after a failed transaction need, and nothing else.

A transaction of this worker that failed ambiguously (its commit may have gone through) leaves the last
stable offset below the high watermark until the coordinator has written its markers; `settled_ends`
waits for that, so a re-sync reads whatever that transaction committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer

# (key, value) of a changelog record.
ChangelogRecord = tuple[bytes | None, bytes | None]


class ChangelogReader:
    """A read_committed consumer assigned to changelog partitions; `async with` starts and stops it."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self.consumer: AIOKafkaConsumer = make_consumer(settings, isolation_level="read_committed")

    async def __aenter__(self) -> ChangelogReader:
        await self.consumer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.consumer.stop()

    def _tps(self, partitions: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(partitions)]

    async def bounds(self, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Per partition: its first offset (retention deleted what is before) and its last stable offset."""
        tps = self._tps(partitions)
        starts = await self.consumer.beginning_offsets(tps)
        ends = await self.consumer.end_offsets(tps)
        return {tp.partition: (starts[tp], ends[tp]) for tp in tps}

    async def settled_ends(self, partitions: Iterable[int], timeout_s: float = 60.0) -> dict[int, int]:
        """The partitions' ends once no transaction is open on them (last stable offset = high watermark)."""
        tps = self._tps(partitions)
        probe = make_consumer(self.settings, isolation_level="read_uncommitted")
        await probe.start()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                stable = await self.consumer.end_offsets(tps)
                high = await probe.end_offsets(tps)
                if all(stable[tp] >= high[tp] for tp in tps):
                    return {tp.partition: stable[tp] for tp in tps}
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a transaction stayed open on {self.topic} for {timeout_s:.0f}s")
                await asyncio.sleep(0.2)  # the coordinator is writing the markers of a finished transaction
        finally:
            await probe.stop()

    async def read(self, positions: dict[int, int], ends: dict[int, int]) -> dict[int, list[ChangelogRecord]]:
        """The records of each partition from its position up to (not including) its end, in offset order."""
        consumer = self.consumer
        tps = {p: TopicPartition(self.topic, p) for p in positions}
        consumer.assign(list(tps.values()))
        for partition, tp in tps.items():
            consumer.seek(tp, positions[partition])
        held: dict[int, list[ChangelogRecord]] = {p: [] for p in positions}
        remaining = {tp: p for p, tp in tps.items() if positions[p] < ends[p]}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)
            for tp, part in fetched.items():
                partition = remaining[tp]
                records = held[partition]
                for record in part:
                    if record.offset >= ends[partition]:
                        break
                    records.append((record.key, record.value))
                if part and part[-1].offset + 1 >= ends[partition]:
                    del remaining[tp]
            for tp, partition in list(remaining.items()):
                if await consumer.position(tp) >= ends[partition]:  # the rest were markers or aborted
                    del remaining[tp]
        return held

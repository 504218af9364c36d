"""Topic reads for tests through long-lived readers, instead of a fresh consumer per poll.

A test that waits for records polls: `wait_for(lambda: len(read_records(settings, topic)) >= n)`. Each
poll used to start a consumer (connections, metadata, a whole read of the topic from its beginning), so a
wait cost broker and CPU time for every poll. A `TopicWatcher` keeps one `pipeline.kafka.reading.
TopicReader` open on a loop thread and the records it has read in memory; a poll reads only what arrived
since the last one (from the remembered positions up to the current end offsets) and answers from memory.
What a poll returns is what a fresh read would: every committed record up to the end at the time of the
call, partition by partition, each in offset order.

One watcher per topic and client settings, each with its own reader and the positions it reached.
The watchers live for one test (the autouse `topic_watchers` fixture in
rigs.fixtures closes them at its end): a test's records never outlive it, and a broker a test stopped
leaves no consumer behind.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pipeline.config import Settings
from pipeline.kafka.reading import Record, TopicReader
from rigs.kafka import LoopThread


class TopicWatcher:
    """What has been read of one topic so far, and the reader that reads the rest."""

    def __init__(self, settings: Settings, topic: str, loop: LoopThread) -> None:
        self.topic = topic
        self.loop = loop
        self.reader: TopicReader = loop.run(self._open(settings))
        self.lock = asyncio.Lock()  # one read at a time per reader; bound to the loop on first use
        self.held: dict[int, list[Record]] = {}
        self.next_offsets: dict[int, int] = {}

    @staticmethod
    async def _open(settings: Settings) -> TopicReader:
        """On the loop thread: a consumer belongs to the loop it is made on."""
        reader = TopicReader(settings, max_partition_fetch_bytes=16 * 1024 * 1024)
        return await reader.__aenter__()

    def records(self) -> list[Record]:
        """Every record of the topic up to its current end: those read before, plus what arrived since."""
        return list(self.loop.run(self._catch_up(), timeout=300))

    async def _catch_up(self) -> list[Record]:
        async with self.lock:
            bounds = await self.reader.bounds(self.topic)
            ranges = {p: (max(first, self.next_offsets.get(p, 0)), end) for p, (first, end) in bounds.items()}
            for record in await self.reader.read(self.topic, ranges):
                self.held.setdefault(record.partition, []).append(record)
            for p, (first, end) in ranges.items():
                cut = self.reader.unfinished.get(p)  # a read cut short resumes where it stopped
                self.next_offsets[p] = cut[0] if cut is not None else max(first, end)
            return [record for p in sorted(self.held) for record in self.held[p]]

    def close(self) -> None:
        try:
            self.loop.run(self.reader.__aexit__(None, None, None), timeout=30)
        except Exception:  # noqa: BLE001 - e.g. a broker the test stopped: nothing left to close cleanly
            pass


class TopicWatchers:
    """The running test's watchers, on one loop thread."""

    def __init__(self) -> None:
        self.loop: LoopThread | None = None
        self.watchers: dict[tuple[str, str], TopicWatcher] = {}
        self.guard = threading.Lock()  # a test may poll from threads of its own

    def watcher(self, settings: Settings, topic: str) -> TopicWatcher:
        key = (settings.kafka.model_dump_json(), topic)  # bootstrap servers and security, and the topic
        with self.guard:
            if key not in self.watchers:
                if self.loop is None:
                    self.loop = LoopThread()
                self.watchers[key] = TopicWatcher(settings, topic, self.loop)
            return self.watchers[key]

    def records(self, settings: Settings, topic: str) -> list[Any]:
        return self.watcher(settings, topic).records()

    def close(self) -> None:
        with self.guard:
            for watcher in self.watchers.values():
                watcher.close()
            self.watchers.clear()
            if self.loop is not None:
                self.loop.close()
                self.loop = None


WATCHERS = TopicWatchers()
"""The running test's watchers (a session runs its tests one at a time)."""

"""Deduplication on (tenant, event_id), crash-safe without Kafka transactions (architecture.md "Deduplication").

State is a table of the keyed partitions a worker owns, one entry per id: `[state, first_seen_ms,
partition]`, written through to a compacted changelog topic (so it survives restarts and rebalances:
the worker restores a partition's entries from it on assignment). The table lives in memory or, with
dedup.store = "rocksdb://", in a local RocksDB (rocksdict) so a large window does not need the RAM.
There is no TTL in either, so entries carry their own time and `expire()` deletes old ones, tombstones
included (pitfalls.md).

The order of writes per batch closes the gap between "emitted" and "marked seen":
1. mark every new id PENDING and wait for the changelog's ack;
2. emit the canonical events and wait for their acks;
3. mark them DONE.
A crash after 1 leaves PENDING ids. When such an id comes back (its input was not committed), we look in
events.canonical from the PENDING time on: found -> it was emitted, drop the copy; not found -> emit.
So an id is emitted at most once within the window, and never lost.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

PENDING = "p"
DONE = "d"

# (dedup_key, canonical_key, canonical_json) of one candidate, and the keyed partition it came from.
Candidate = tuple[bytes, bytes, bytes]
Send = Callable[[str, bytes | None, bytes | None, int | None], Awaitable[Awaitable[Any]]]


class RocksStore:
    """The dedup table in a local RocksDB: the dict operations the Deduplicator uses, values as JSON.

    The changelog is the source of truth, so the database starts empty at every start (the worker
    restores what its partitions need); it only moves the table out of the heap.
    """

    def __init__(self, path: Path) -> None:
        import rocksdict  # optional: pip install 'headwater[rocksdb]'

        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = rocksdict.Rdict(str(path))

    def get(self, key: bytes, default: Any = None) -> Any:
        value = self.db.get(key)
        return default if value is None else orjson.loads(value)

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.db[key] = orjson.dumps(value)

    def __delitem__(self, key: bytes) -> None:
        del self.db[key]

    def pop(self, key: bytes, default: Any = None) -> Any:
        value = self.get(key, default)
        if key in self.db:
            del self.db[key]
        return value

    def items(self) -> Iterator[tuple[bytes, Any]]:
        for key, value in self.db.items():
            yield key, orjson.loads(value)

    def __len__(self) -> int:
        return sum(1 for _ in self.db.keys())

    def close(self) -> None:
        self.db.close()


def make_store(url: str, data_dir: Path) -> Any:
    """"memory://" -> a dict; "rocksdb://" -> a RocksStore under the worker's data dir."""
    if url.startswith("rocksdb:"):
        return RocksStore(data_dir / "dedup.rocksdb")
    if url.startswith("memory:"):
        return {}
    raise ValueError(f"dedup.store must be memory:// or rocksdb://, not {url!r}")


@dataclass
class DedupVerdicts:
    """What one batch decided: events to emit, copies dropped, and ids a crash left PENDING."""

    emit: list[tuple[Candidate, int]] = field(default_factory=list)
    duplicates: int = 0
    unresolved: list[tuple[Candidate, int, int]] = field(default_factory=list)  # + pending_since_ms


class Deduplicator:
    """Check-and-set on the dedup table. Single-threaded per keyed partition, so check-and-set is atomic."""

    def __init__(self, store: Any, changelog_topic: str, window_s: float, send: Send,
                 find_emitted: Callable[[list[bytes], int], Awaitable[set[bytes]]]) -> None:
        self.store = store              # the table's data (Faust store: dict-like)
        self.changelog_topic = changelog_topic
        self.window_ms = int(window_s * 1000)
        self.send = send
        self.find_emitted = find_emitted
        self.dropped = 0

    def _live(self, entry: Any, now_ms: int) -> bool:
        return isinstance(entry, list) and len(entry) == 3 and now_ms - int(entry[1]) < self.window_ms

    def decide(self, batch: Iterable[tuple[Candidate, int]], now_ms: int, reemit: bool = False) -> DedupVerdicts:
        """Split a batch; with `reemit` (a deliberate replay) ids already seen are emitted again, once."""
        verdicts = DedupVerdicts()
        claimed: set[bytes] = set()
        for candidate, partition in batch:
            key = candidate[0]
            if key in claimed:
                verdicts.duplicates += 1
                continue
            entry = None if reemit else self.store.get(key)
            if self._live(entry, now_ms):
                if entry[0] == DONE:
                    verdicts.duplicates += 1
                    continue
                verdicts.unresolved.append((candidate, partition, int(entry[1])))
            else:
                verdicts.emit.append((candidate, partition))
            claimed.add(key)
        return verdicts

    async def mark(self, items: Iterable[tuple[bytes, int]], state: str, now_ms: int) -> list[Awaitable[Any]]:
        """Write entries to the store and the changelog; returns the changelog acks to wait for."""
        acks = []
        for key, partition in items:
            value = [state, now_ms, partition]
            self.store[key] = value
            acks.append(await self.send(self.changelog_topic, key, orjson.dumps(value), partition))
        return acks

    async def run(self, batch: list[tuple[Candidate, int]],
                  emit: Callable[[list[Candidate]], Awaitable[None]], reemit: bool = False) -> tuple[int, int]:
        """Dedup one batch and emit the survivors. Returns (emitted, duplicates dropped)."""
        now_ms = int(time.time() * 1000)
        verdicts = self.decide(batch, now_ms, reemit)
        if verdicts.unresolved:
            since = min(p for _, _, p in verdicts.unresolved)
            keys = [c[0] for c, _, _ in verdicts.unresolved]
            emitted_before = await self.find_emitted(keys, since)
            for candidate, partition, _ in verdicts.unresolved:
                if candidate[0] in emitted_before:
                    verdicts.duplicates += 1
                    await asyncio.gather(*await self.mark([(candidate[0], partition)], DONE, now_ms))
                else:
                    verdicts.emit.append((candidate, partition))
            log.info("resolved %d ids left PENDING by a crash: %d already emitted",
                     len(verdicts.unresolved), len(emitted_before))
        if verdicts.emit:
            keys = [(c[0], p) for c, p in verdicts.emit]
            await asyncio.gather(*await self.mark(keys, PENDING, now_ms))
            await emit([c for c, _ in verdicts.emit])
            await asyncio.gather(*await self.mark(keys, DONE, now_ms))  # acked before the offset commit
        self.dropped += verdicts.duplicates
        return len(verdicts.emit), verdicts.duplicates

    async def expire(self, now_ms: int | None = None, limit: int = 100_000) -> int:
        """Delete entries older than the window, locally and in the changelog (tombstones)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        expired = []
        for key, entry in self.store.items():
            if not self._live(entry, now_ms):
                expired.append((key, entry))
                if len(expired) >= limit:
                    break
        for key, entry in expired:
            partition = int(entry[2]) if isinstance(entry, list) and len(entry) == 3 else None
            del self.store[key]
            await self.send(self.changelog_topic, key, None, partition)
        return len(expired)

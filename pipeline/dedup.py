"""Deduplication on (tenant, event_id), crash-safe without Kafka transactions (architecture.md "Deduplication").

State is a Faust table (changelog-backed, so it survives restarts and rebalances), one entry per id:
`[state, first_seen_ms, partition]`. Faust tables have no TTL, so entries carry their own time and
`expire()` deletes old ones, tombstones included (pitfalls.md).

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
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

PENDING = "p"
DONE = "d"

# (dedup_key, canonical_key, canonical_json) of one candidate, and the keyed partition it came from.
Candidate = tuple[bytes, bytes, bytes]
Send = Callable[[str, bytes | None, bytes | None, int | None], Awaitable[Awaitable[Any]]]


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

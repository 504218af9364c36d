"""Deduplication on (tenant, event_id), exactly once with Kafka transactions
(docs/architecture.md, "Deduplication").

State is one FingerprintTable per keyed partition a worker owns: each id held as the 128-bit fingerprint
of its dedup key with its first-seen second, and no Python object per id (docs/dedup.md: sizing, the
collision bound). It is restored on assignment from a local checkpoint plus the changelog written after it
(pipeline.stream.dedup_checkpoint), or from the whole changelog (read_committed). The changelog holds one
binary record per transaction and CHANGELOG_RECORD_IDS ids: the fingerprints of a transaction's new ids,
which share their time and partition. Entries carry their own time (Kafka tables have no TTL) and
`expire()` deletes old ones by time bucket; the changelog's old records are deleted by the broker's
retention (window + 1 h), and a restore skips what is past the window.

One transaction per keyed partition and batch (pipeline.stream.dedup_stage) holds the canonical events,
the changelog records of their ids and the batch's input offsets: all or nothing. So a crash can leave
neither an event without its entry nor an entry without its event, and `Deduplicator` is pure
check-and-set: `decide` splits a batch, `remember_emitted` writes the table once the transaction has
committed. Changelog records of earlier releases are still restored: JSON lists of ids per transaction,
and per-id entries (DONE = seen, PENDING = not seen) with their tombstones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from pipeline.stream.fingerprint_table import FINGERPRINT_BYTES, FingerprintTable, fingerprint

log = logging.getLogger(__name__)

PENDING = "p"  # per-id entries of the earliest releases; read as "not seen"
DONE = "d"

# (dedup_key, canonical_key, canonical_json) of one candidate.
Candidate = tuple[bytes, bytes, bytes]
# A binary changelog record: this prefix, first_seen_ms (8 bytes big-endian), the keyed partition (4 bytes
# big-endian), then the ids' 16-byte fingerprints. JSON records of earlier releases start with '{' or '['.
CHANGELOG_MAGIC = b"HWF1"
CHANGELOG_HEADER_BYTES = len(CHANGELOG_MAGIC) + 12
# Fingerprints per changelog record: 512 KiB, under Kafka's default 1 MiB record limit.
CHANGELOG_RECORD_IDS = 32_768


@dataclass
class DedupVerdicts:
    """What one batch decided: the events to emit (and their ids' fingerprints) and the copies dropped."""

    emit: list[Candidate] = field(default_factory=list)
    fingerprints: list[bytes] = field(default_factory=list)
    duplicates: int = 0


def _second(ms: int) -> int:
    """A first-seen time in whole seconds, rounded up so that an id is held at least the window, within
    the table's 32 bits (until 2106)."""
    return min(max(-(-ms // 1000), 1), 0xFFFFFFFF)


class Deduplicator:
    """Check-and-set on the dedup tables. Single-threaded per keyed partition, so check-and-set is atomic."""

    def __init__(self, window_s: float, bucket_s: float = 60.0) -> None:
        self.window_ms = int(window_s * 1000)
        self.bucket_s = max(1, int(bucket_s))
        self.tables: dict[int, FingerprintTable] = {}

    def __len__(self) -> int:
        return sum(len(table) for table in self.tables.values())

    def table(self, partition: int) -> FingerprintTable:
        """The table of a keyed partition (empty if it holds nothing yet)."""
        table = self.tables.get(partition)
        if table is None:
            table = self.tables[partition] = FingerprintTable(self.bucket_s)
        return table

    def drop(self, partition: int) -> None:
        """Forget a keyed partition's table (not owned any more, or about to be restored)."""
        self.tables.pop(partition, None)

    def _live_after_s(self, now_ms: int) -> int:
        """Ids first seen after this second are within the window at now_ms."""
        return (now_ms - self.window_ms) // 1000

    def decide(
        self, partition: int, batch: Iterable[Candidate], now_ms: int, reemit: bool = False
    ) -> DedupVerdicts:
        """Split a batch of a keyed partition; with `reemit` (a deliberate replay) ids already seen are
        emitted again, once."""
        verdicts = DedupVerdicts()
        emit = verdicts.emit
        fingerprints = verdicts.fingerprints
        claimed: set[bytes] = set()
        holds = self.table(partition).holds
        after_s = self._live_after_s(now_ms)
        for candidate in batch:
            fp = fingerprint(candidate[0])
            if fp in claimed or (not reemit and holds(fp, after_s)):
                verdicts.duplicates += 1
                continue
            emit.append(candidate)
            fingerprints.append(fp)
            claimed.add(fp)
        return verdicts

    @staticmethod
    def changelog_records(
        fingerprints: Sequence[bytes], partition: int, now_ms: int, first_offset: int
    ) -> list[tuple[bytes, bytes]]:
        """The changelog records (key, value) of one transaction's new ids: CHANGELOG_MAGIC, the time and
        the partition, then the fingerprints, CHANGELOG_RECORD_IDS a record. The key names the keyed
        partition and the offset of the transaction's first input record, so it is unique per
        transaction, and it has no '/', so it is never a dedup key (tenant/event_id) of the earliest
        per-id layout."""
        header = CHANGELOG_MAGIC + now_ms.to_bytes(8, "big") + partition.to_bytes(4, "big")
        return [
            (
                b"ids:%d:%d:%d" % (partition, first_offset, chunk),
                header + b"".join(fingerprints[start : start + CHANGELOG_RECORD_IDS]),
            )
            for chunk, start in enumerate(range(0, len(fingerprints), CHANGELOG_RECORD_IDS))
        ]

    def restore(self, partition: int, key: bytes | None, value: bytes | None, now_ms: int) -> int:
        """Apply one record of the keyed partition's changelog, read in offset order; returns the ids it
        added to the table.

        A record of ids whose time is past the window is skipped (the broker's retention deletes it
        later). Records of earlier releases apply as they did: a JSON list of a transaction's ids, or a
        per-id entry or its tombstone."""
        table = self.table(partition)
        if value is None:
            if key is not None:
                table.discard(fingerprint(key))
            return 0
        if value.startswith(CHANGELOG_MAGIC):
            first_seen = int.from_bytes(value[4:12], "big")
            if now_ms - first_seen >= self.window_ms:
                return 0
            return table.add_all(value[CHANGELOG_HEADER_BYTES:], _second(first_seen))
        doc = orjson.loads(value)
        if isinstance(doc, dict):
            first_seen = int(doc["first_seen_ms"])
            if now_ms - first_seen >= self.window_ms:
                return 0
            fps = b"".join(fingerprint(found.encode()) for found in doc["ids"])
            return table.add_all(fps, _second(first_seen))
        if (
            key is None
            or not isinstance(doc, list)
            or len(doc) != 3
            or doc[0] != DONE
            or now_ms - int(doc[1]) >= self.window_ms
        ):
            return 0
        table.add(fingerprint(key), _second(int(doc[1])))
        return 1

    @staticmethod
    def restored_ids(value: bytes | None) -> int:
        """How many ids a binary changelog record carries (0 for other records), to size a table first."""
        if value is None or not value.startswith(CHANGELOG_MAGIC):
            return 0
        return (len(value) - CHANGELOG_HEADER_BYTES) // FINGERPRINT_BYTES

    def remember_emitted(self, partition: int, fingerprints: Sequence[bytes], now_ms: int) -> None:
        """Write the ids of a committed transaction of a keyed partition to its table (their changelog
        records are committed)."""
        self.table(partition).add_all(b"".join(fingerprints), _second(now_ms))  # one pass, split once

    def expire(self, now_ms: int | None = None, limit: int = 200_000) -> int:
        """Delete ids older than the window from the tables (the changelog's records of them are deleted
        by the broker's retention; a restore skips them meanwhile).

        The work is proportional to what expires (the tables' time buckets), about `limit` ids per call
        (whole time buckets), so the caller can release its lock between calls.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff_s = self._live_after_s(now_ms)
        expired = 0
        for table in list(self.tables.values()):
            if expired >= limit:
                break
            expired += table.expire(cutoff_s, limit - expired)
        return expired

"""Deduplication on (tenant, event_id), exactly once with Kafka transactions
(docs/architecture.md, "Deduplication").

State is a table of the keyed partitions a worker owns, one entry per id: `(state, first_seen_ms,
partition)`. The table lives in memory or, with dedup.store = "rocksdb://", in a local RocksDB (rocksdict)
so a large window does not need the RAM; either way it is rebuilt from the changelog topic (read_committed)
on assignment, so it survives restarts and rebalances. The changelog holds one record per transaction and
160 KiB of ids (`changelog_records`), not one per id: the ids of a transaction share their time and
partition, and a record per id cost the stage a Kafka record per event. There is no TTL in either store, so
entries carry their own time and `expire()` deletes old ones through a time-bucketed index (docs/pitfalls.md);
the changelog's old records are deleted by the broker's retention (window + 1 h), and a restore skips what
is past the window.

One transaction per keyed partition and batch (pipeline.stream.dedup_stage) holds the canonical events,
the changelog records of their ids and the batch's input offsets: all or nothing. So a crash can leave
neither an event without its entry nor an entry without its event, and `Deduplicator` is pure
check-and-set: `decide` splits a batch, `remember_emitted` writes the table once the transaction has
committed. (Per-id entries written by earlier releases are still restored: DONE = seen, PENDING = not
seen, so one event may be emitted a second time across the upgrade to transactions.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import orjson

from pipeline.errors import HeadwaterError

log = logging.getLogger(__name__)

PENDING = "p"  # written only by the earlier design; read as "not seen"
DONE = "d"

# (dedup_key, canonical_key, canonical_json) of one candidate.
Candidate = tuple[bytes, bytes, bytes]
# The ids' UTF-8 bytes per changelog record: under Kafka's default 1 MiB record limit even if every
# character had to be JSON-escaped (6 bytes), whatever limit the topic was given.
CHANGELOG_RECORD_ID_BYTES = 160 * 1024


class Store(Protocol):
    """The dict operations the Deduplicator and the dedup stage use on the table."""

    def get(self, key: bytes, default: Any = None, /) -> Any: ...
    def __setitem__(self, key: bytes, value: Any, /) -> None: ...
    def __delitem__(self, key: bytes, /) -> None: ...
    def pop(self, key: bytes, default: Any = None, /) -> Any: ...
    def items(self) -> Iterable[tuple[bytes, Any]]: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryStore(dict[bytes, Any]):
    """dedup.store = "memory://": the table as a dict on the heap; closing it releases nothing."""

    def close(self) -> None:
        pass


class StoreLocked(HeadwaterError):
    """Another process holds this dedup store's directory (two workers on one data_dir?)."""


class RocksStore:
    """The dedup table in a local RocksDB: the dict operations the Deduplicator uses, values as JSON.

    The changelog is the source of truth, so the table starts empty at every open (the worker restores
    what its partitions need); RocksDB only moves it out of the heap. The directory is owned by one
    process at a time: `open` takes an exclusive lock next to it, so a second worker or tool on the same
    data_dir fails with StoreLocked instead of deleting a live table. Only the lock holder clears the
    directory, and only the database it is about to create.
    """

    def __init__(self, path: Path) -> None:
        import rocksdict  # optional: pip install 'headwater[rocksdb]'

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_exclusively(path.with_name(path.name + ".lock"))
        shutil.rmtree(path, ignore_errors=True)  # a table left by an earlier holder of the lock
        self.path = path
        self.db = rocksdict.Rdict(str(path))
        self._count = 0  # entries held, kept as they are written (a RocksDB count would scan the table)

    def get(self, key: bytes, default: Any = None) -> Any:
        value = self.db.get(key)
        return default if value is None else orjson.loads(value)

    def __setitem__(self, key: bytes, value: Any) -> None:
        if key not in self.db:
            self._count += 1
        self.db[key] = orjson.dumps(value)

    def __delitem__(self, key: bytes) -> None:
        del self.db[key]
        self._count -= 1

    def pop(self, key: bytes, default: Any = None) -> Any:
        value = self.get(key, default)
        if key in self.db:
            del self[key]
        return value

    def items(self) -> Iterator[tuple[bytes, Any]]:
        for key, value in self.db.items():
            yield cast(bytes, key), orjson.loads(value)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self.db.close()
        self._lock.close()  # releases the flock


def _lock_exclusively(path: Path) -> IO[str]:
    """An exclusive, non-blocking flock on `path`, held while the returned file is open."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StoreLocked(
            f"the dedup store {path.with_suffix('')} is in use by {holder}; "
            "give each worker its own worker.data_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def open_store(url: str, data_dir: Path) -> Store:
    """ "memory://" -> a dict; "rocksdb://" -> a RocksStore under the worker's data dir."""
    if url.startswith("rocksdb:"):
        return RocksStore(data_dir / "dedup.rocksdb")
    if url.startswith("memory:"):
        return cast(Store, MemoryStore())  # every Store operation; the overloaded dict.get() defeats mypy
    raise ValueError(f"dedup.store must be memory:// or rocksdb://, not {url!r}")


def entry_partition(entry: Any) -> int | None:
    """The keyed partition an entry belongs to (its third field)."""
    return int(entry[2]) if isinstance(entry, list | tuple) and len(entry) >= 3 else None


@dataclass
class DedupVerdicts:
    """What one batch decided: the events to emit and the copies dropped."""

    emit: list[Candidate] = field(default_factory=list)
    duplicates: int = 0


class ExpiryIndex:
    """The table's keys by the time bucket of their first sighting, so that expiry visits only the keys
    that expire (whole buckets older than the window), never the whole table.

    A key whose entry was replaced later sits in an older bucket too; expiry checks the entry's own time
    before deleting it. Memory: one reference per key plus a set slot (~60 bytes), for either store.
    """

    def __init__(self, bucket_ms: int) -> None:
        self.bucket_ms = max(1, bucket_ms)
        self.buckets: dict[int, set[bytes]] = {}

    def add(self, key: bytes, first_seen_ms: int) -> None:
        bucket = first_seen_ms // self.bucket_ms
        keys = self.buckets.get(bucket)
        if keys is None:
            self.buckets[bucket] = keys = set()
        keys.add(key)

    def add_all(self, keys: Iterable[bytes], first_seen_ms: int) -> None:
        """Index keys first seen at the same time (the ids of one transaction)."""
        bucket = first_seen_ms // self.bucket_ms
        found = self.buckets.get(bucket)
        if found is None:
            self.buckets[bucket] = found = set()
        found.update(keys)

    def pop_older_than(self, cutoff_ms: int, limit: int) -> list[bytes]:
        """Keys of the buckets that end at or before cutoff_ms, whole buckets, until at least `limit`."""
        out: list[bytes] = []
        for bucket in sorted(b for b in self.buckets if (b + 1) * self.bucket_ms <= cutoff_ms):
            if len(out) >= limit:
                break
            out.extend(self.buckets.pop(bucket))
        return out

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.buckets.values())


class Deduplicator:
    """Check-and-set on the dedup table. Single-threaded per keyed partition, so check-and-set is atomic."""

    def __init__(self, store: Any, window_s: float, bucket_s: float = 60.0) -> None:
        self.store = store  # the table's data (dict-like)
        self.window_ms = int(window_s * 1000)
        self.index = ExpiryIndex(int(bucket_s * 1000))
        for key, entry in store.items():  # a store handed over with entries (tests; RocksDB starts empty)
            self.remember(key, entry)

    def remember(self, key: bytes, entry: Any) -> None:
        """Index an entry written to the store (by a batch or by the restore from the changelog)."""
        if isinstance(entry, list | tuple) and len(entry) >= 2:
            self.index.add(key, int(entry[1]))

    def _seen(self, entry: Any, now_ms: int) -> bool:
        return (
            isinstance(entry, list | tuple)
            and len(entry) == 3
            and entry[0] == DONE
            and self._live(entry, now_ms)
        )

    def _live(self, entry: Any, now_ms: int) -> bool:
        return isinstance(entry, list | tuple) and len(entry) == 3 and now_ms - int(entry[1]) < self.window_ms

    def decide(self, batch: Iterable[Candidate], now_ms: int, reemit: bool = False) -> DedupVerdicts:
        """Split a batch; with `reemit` (a deliberate replay) ids already seen are emitted again, once."""
        verdicts = DedupVerdicts()
        emit = verdicts.emit
        claimed: set[bytes] = set()
        get = self.store.get
        for candidate in batch:
            key = candidate[0]
            if key in claimed or (not reemit and self._seen(get(key), now_ms)):
                verdicts.duplicates += 1
                continue
            emit.append(candidate)
            claimed.add(key)
        return verdicts

    @staticmethod
    def changelog_records(
        emitted: Sequence[Candidate], partition: int, now_ms: int, first_offset: int
    ) -> list[tuple[bytes, bytes]]:
        """The changelog records (key, value) of one transaction's new ids: {"first_seen_ms",
        "partition", "ids"}, a record per CHANGELOG_RECORD_ID_BYTES of ids (~3,500 ids of 45 bytes). The
        key names the keyed partition and the offset of the transaction's first input record, so it is
        unique per transaction, and it has no '/', so it is never a dedup key (tenant/event_id) of the
        earlier per-id layout."""
        chunks: list[list[str]] = []
        ids: list[str] = []
        size = 0
        for candidate in emitted:
            key = candidate[0]
            if size + len(key) > CHANGELOG_RECORD_ID_BYTES and ids:
                chunks.append(ids)
                ids, size = [], 0
            ids.append(key.decode())
            size += len(key)
        if ids:
            chunks.append(ids)
        return [
            (
                b"ids:%d:%d:%d" % (partition, first_offset, chunk),
                orjson.dumps({"first_seen_ms": now_ms, "partition": partition, "ids": part}),
            )
            for chunk, part in enumerate(chunks)
        ]

    def restore(self, key: bytes | None, value: bytes | None, now_ms: int) -> int:
        """Apply one changelog record, read in offset order; returns the ids it wrote to the table.

        A record of ids whose time is past the window is skipped (the broker's retention deletes it
        later). Records of the earlier per-id layout are applied as they were: an entry, or a tombstone."""
        store = self.store
        if value is None:
            if key is not None:
                store.pop(key, None)
            return 0
        doc = orjson.loads(value)
        if isinstance(doc, dict):
            first_seen = int(doc["first_seen_ms"])
            if now_ms - first_seen >= self.window_ms:
                return 0
            keys = [found.encode() for found in doc["ids"]]
            self._remember_seen(keys, first_seen, int(doc["partition"]))
            return len(keys)
        if key is None or not self._live(doc, now_ms):
            return 0
        entry = tuple(doc)  # held as a tuple, as remember_emitted writes it
        store[key] = entry
        self.remember(key, entry)
        return 1

    def remember_emitted(self, emitted: Iterable[Candidate], partition: int, now_ms: int) -> None:
        """Write the ids of a committed transaction of a keyed partition to the table (its changelog
        records are committed)."""
        self._remember_seen([candidate[0] for candidate in emitted], now_ms, partition)

    def _remember_seen(self, keys: list[bytes], first_seen_ms: int, partition: int) -> None:
        """Mark ids first seen together (one transaction's) as seen, and index them by that time. They
        share one entry: a tuple of atoms, which the garbage collector does not track (a list per id made
        every full collection walk the whole table)."""
        store = self.store
        entry = (DONE, first_seen_ms, partition)
        for key in keys:
            store[key] = entry
        self.index.add_all(keys, first_seen_ms)

    def expire(self, now_ms: int | None = None, limit: int = 200_000) -> int:
        """Delete entries older than the window from the table (the changelog's records of them are
        deleted by the broker's retention; a restore skips them meanwhile).

        The work is proportional to what expires (ExpiryIndex buckets), at most about `limit` keys per
        call (whole buckets), so the caller can release its lock between calls.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        expired = 0
        for key in self.index.pop_older_than(now_ms - self.window_ms, limit):
            entry = self.store.get(key)
            if entry is None or self._live(entry, now_ms):
                continue  # deleted already, or replaced by a newer entry (indexed in its own bucket)
            del self.store[key]
            expired += 1
        return expired

"""The dedup check-and-set (pipeline/stream/dedup.py), driven directly: a dict as the table's store, and the
changelog records it writes and restores from. The transaction that makes an emission and its entry atomic
is tested on the broker (tests/test_exactly_once.py, tests/test_scale_out.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.stream.dedup import (
    CHANGELOG_RECORD_ID_BYTES,
    DONE,
    PENDING,
    Candidate,
    Deduplicator,
    RocksStore,
    Store,
    StoreLocked,
    open_store,
)

WINDOW_S = 3600.0


def candidate(event_id: str, tenant: str = "acme") -> Candidate:
    return (f"{tenant}/{event_id}".encode(), b"acme/u1", orjson.dumps({"event_id": event_id}))


def make(store: Store | dict[bytes, Any]) -> Deduplicator:
    return Deduplicator(store, WINDOW_S)


def run(
    dedup: Deduplicator, batch: list[Candidate], reemit: bool = False, partition: int = 0
) -> tuple[list[bytes], tuple[int, int]]:
    """One batch of a keyed partition as the stage runs it: decide, then (the transaction committed)
    remember the emitted ids."""
    import time

    now_ms = int(time.time() * 1000)
    verdicts = dedup.decide(batch, now_ms, reemit)
    dedup.remember_emitted(verdicts.emit, partition, now_ms)
    return [c[0] for c in verdicts.emit], (len(verdicts.emit), verdicts.duplicates)


def test_first_copy_wins_and_later_copies_are_dropped() -> None:
    """Within the window the first emission of (tenant, event_id) wins; repeats are counted, not emitted."""
    store: dict[bytes, Any] = {}
    dedup = make(store)
    emitted, (n, dropped) = run(dedup, [candidate("a"), candidate("a"), candidate("b")])
    assert (emitted, n, dropped) == ([b"acme/a", b"acme/b"], 2, 1)
    emitted, (n, dropped) = run(dedup, [candidate("a")])
    assert (emitted, n, dropped) == ([], 0, 1)


def test_the_same_id_from_two_tenants_is_two_events() -> None:
    """The key is (tenant, event_id): another tenant's id never collides."""
    dedup = make({})
    emitted, _ = run(dedup, [candidate("a", "acme"), candidate("a", "globex")])
    assert emitted == [b"acme/a", b"globex/a"]


def test_nothing_is_marked_seen_until_the_transaction_has_committed() -> None:
    """decide() leaves the table alone: an aborted transaction leaves every id new for the replayed batch."""
    store: dict[bytes, Any] = {}
    dedup = make(store)
    verdicts = dedup.decide([candidate("a")], 1_000)
    assert store == {} and len(verdicts.emit) == 1
    dedup.remember_emitted(verdicts.emit, 2, 1_000)
    assert store == {b"acme/a": (DONE, 1_000, 2)}  # a tuple: the garbage collector does not track it


def test_an_entry_left_pending_by_the_earlier_design_is_not_seen() -> None:
    """A PENDING entry (written before transactions) may never have been emitted: its id is emitted."""
    dedup = make({b"acme/a": [PENDING, 10**13, 0]})
    emitted, _ = run(dedup, [candidate("a")])
    assert emitted == [b"acme/a"]


def test_a_reemit_replay_emits_a_seen_id_once_more() -> None:
    """replay --reemit: an id already seen is emitted again, once per batch."""
    dedup = make({})
    run(dedup, [candidate("a")])
    emitted, (_, dropped) = run(dedup, [candidate("a"), candidate("a")], reemit=True)
    assert (emitted, dropped) == ([b"acme/a"], 1)


def test_entries_older_than_the_window_expire() -> None:
    """Faust tables have no TTL: expire() deletes old ids from the table at most one expiry bucket
    (dedup.expire_every, 60 s here) after the window (the broker's retention deletes their changelog)."""
    store: dict[bytes, Any] = {b"acme/old": [DONE, 0, 3], b"acme/new": [DONE, 10**15, 1]}
    dedup = make(store)
    assert dedup.expire(now_ms=int(WINDOW_S * 1000) + 1) == 0  # its bucket is not over yet
    assert dedup.expire(now_ms=int(WINDOW_S * 1000) + 60_000) == 1
    assert list(store) == [b"acme/new"]


def test_an_expired_id_is_new_again() -> None:
    """After the window an id is emitted again: the window bounds the guarantee (docs/architecture.md)."""
    store: dict[bytes, Any] = {b"acme/a": [DONE, 0, 0]}
    dedup = make(store)
    emitted, _ = run(dedup, [candidate("a")])
    assert emitted == [b"acme/a"]


def test_the_rocksdb_store_keeps_the_same_entries_as_memory(tmp_path: Path) -> None:
    """dedup.store = "rocksdb://": the same verdicts, entries readable back, expiry deletes them."""
    store = open_store("rocksdb://", tmp_path)
    dedup = make(store)
    assert run(dedup, [candidate("a"), candidate("b")])[1] == (2, 0)
    assert run(dedup, [candidate("a")])[1] == (0, 1)
    assert {k: v[0] for k, v in store.items()} == {b"acme/a": DONE, b"acme/b": DONE}
    assert store.pop(b"acme/b")[0] == DONE and store.get(b"acme/b") is None
    assert dedup.expire(now_ms=10**15) == 1
    assert list(store.items()) == []
    store.close()
    reopened = open_store("rocksdb://", tmp_path)
    assert list(reopened.items()) == []  # starts empty: the changelog is the truth
    assert isinstance(reopened, RocksStore)
    reopened.close()


def test_a_second_opener_of_a_rocksdb_store_fails_and_leaves_the_live_table_alone(tmp_path: Path) -> None:
    """A dedup store directory has one owner: a second opener gets StoreLocked, the owner's entries stay."""
    owner = open_store("rocksdb://", tmp_path)
    owner[b"acme/a"] = [DONE, 1, 0]
    with pytest.raises(StoreLocked, match="in use by pid"):
        open_store("rocksdb://", tmp_path)
    assert owner.get(b"acme/a") == [DONE, 1, 0]
    assert isinstance(owner, RocksStore)
    owner.close()


class CountingStore(dict[bytes, Any]):
    """A memory store that counts the lookups expiry makes and refuses full scans once armed."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gets = 0
        self.armed = False

    def get(self, key: bytes, default: Any = None) -> Any:  # type: ignore[override]
        self.gets += 1
        return super().get(key, default)

    def items(self) -> Any:
        assert not self.armed, "expiry scanned the whole table"
        return super().items()


def test_expiry_does_work_proportional_to_what_expires() -> None:
    """With 100,000 live ids and 1,000 expired ones, expire() looks at the expired ones only, no full scan."""
    now = 10**13
    old = {f"acme/old{i}".encode(): [DONE, now - int(WINDOW_S * 1000) - 120_000, 0] for i in range(1000)}
    live = {f"acme/live{i}".encode(): [DONE, now - i, 1] for i in range(100_000)}
    store = CountingStore({**old, **live})
    dedup = make(store)  # type: ignore[arg-type]
    store.armed = True
    assert dedup.expire(now_ms=now) == 1000
    assert store.gets == 1000
    assert len(store) == 100_000


def test_new_ids_are_indexed_by_time_and_expire_once_their_bucket_is_past_the_window() -> None:
    """An id emitted now is expired by a call one window + one bucket later, and only then."""
    store: dict[bytes, Any] = {}
    dedup = make(store)
    run(dedup, [candidate("a")])
    first_seen = store[b"acme/a"][1]
    assert dedup.expire(now_ms=first_seen + int(WINDOW_S * 1000) - 1) == 0
    assert dedup.expire(now_ms=first_seen + int(WINDOW_S * 1000) + 60_000) == 1
    assert store == {}


def test_a_transaction_s_new_ids_are_one_changelog_record_that_restores_them() -> None:
    """The ids of one transaction share their time and partition: one changelog record carries them all,
    keyed by the keyed partition and the transaction's first input offset; a restore rebuilds them."""
    import time

    now = int(time.time() * 1000)
    batch = [candidate("a"), candidate("b"), candidate("a", "globex")]
    records = Deduplicator.changelog_records(batch, 4, now, 77)
    ids = ["acme/a", "acme/b", "globex/a"]
    assert records == [(b"ids:4:77:0", orjson.dumps({"first_seen_ms": now, "partition": 4, "ids": ids}))]
    store: dict[bytes, Any] = {}
    restored = make(store)
    assert restored.restore(*records[0], now_ms=now) == 3
    assert store == {key.encode(): (DONE, now, 4) for key in ids}
    assert run(restored, [candidate("a"), candidate("c")])[0] == [b"acme/c"]
    assert restored.expire(now_ms=now + int(WINDOW_S * 1000) + 60_000) == 4  # indexed by their time


def test_a_large_transaction_s_ids_are_split_into_records_of_bounded_size() -> None:
    """A changelog record stays under Kafka's default 1 MiB record limit whatever a batch holds, even with
    ids of the longest kind made of characters that JSON escapes."""
    batch = [candidate(f"e{i:05d}") for i in range(10_000)]  # keys of 11 bytes: 110,000 bytes in all
    batch += [candidate("\x01" * 256, tenant="t" * 256) for _ in range(400)]
    records = Deduplicator.changelog_records(batch, 0, 1_000, 5)
    assert [key for key, _ in records] == [b"ids:0:5:%d" % n for n in range(len(records))]
    assert len(records) >= 2 and all(len(value) < 1_048_576 for _, value in records)
    ids = [found for _, value in records for found in orjson.loads(value)["ids"]]
    assert ids == [c[0].decode() for c in batch]  # every id once, in order
    for _, value in records:
        assert sum(len(found.encode()) for found in orjson.loads(value)["ids"]) <= CHANGELOG_RECORD_ID_BYTES
    store: dict[bytes, Any] = {}
    restored = make(store)
    assert sum(restored.restore(key, value, now_ms=1_000) for key, value in records) == len(batch)


def test_a_restore_skips_ids_past_the_window_and_reads_the_earlier_per_id_layout() -> None:
    """Records past the window are not restored (retention deletes them later); per-id entries and
    tombstones written by earlier releases still apply, in offset order."""
    store: dict[bytes, Any] = {}
    dedup = make(store)
    now = 10**13
    old_pack = Deduplicator.changelog_records([candidate("old")], 0, now - int(WINDOW_S * 1000), 1)[0]
    assert dedup.restore(*old_pack, now_ms=now) == 0
    assert dedup.restore(b"acme/x", orjson.dumps([DONE, now - 5, 2]), now) == 1
    assert dedup.restore(b"acme/y", orjson.dumps([DONE, now - 5, 2]), now) == 1
    assert dedup.restore(b"acme/y", None, now) == 0  # its tombstone
    assert dedup.restore(b"acme/z", orjson.dumps([DONE, 0, 2]), now) == 0  # expired
    assert store == {b"acme/x": (DONE, now - 5, 2)}

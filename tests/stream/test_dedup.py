"""The dedup check-and-set (pipeline/stream/dedup.py), driven directly: a dict as the table's store and a
list as the changelog. The transaction that makes an emission and its entry atomic is tested on the broker
(tests/test_exactly_once.py, tests/test_scale_out.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.stream.dedup import DONE, PENDING, Candidate, Deduplicator, RocksStore, StoreLocked, open_store

WINDOW_S = 3600.0


class Changelog:
    """Records what the deduplicator writes to its changelog topic (expiry tombstones), acknowledging at once."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, Any, int | None]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None) -> Awaitable[Any]:
        self.records.append((key, orjson.loads(value) if value is not None else None, partition))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def candidate(event_id: str, tenant: str = "acme") -> Candidate:
    return (f"{tenant}/{event_id}".encode(), b"acme/u1", orjson.dumps({"event_id": event_id}))


def make(store: dict[bytes, Any]) -> tuple[Deduplicator, Changelog]:
    changelog = Changelog()
    return Deduplicator(store, "dedup-changelog", WINDOW_S, changelog.send), changelog


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
    dedup, _ = make(store)
    emitted, (n, dropped) = run(dedup, [candidate("a"), candidate("a"), candidate("b")])
    assert (emitted, n, dropped) == ([b"acme/a", b"acme/b"], 2, 1)
    emitted, (n, dropped) = run(dedup, [candidate("a")])
    assert (emitted, n, dropped) == ([], 0, 1)


def test_the_same_id_from_two_tenants_is_two_events() -> None:
    """The key is (tenant, event_id): another tenant's id never collides."""
    dedup, _ = make({})
    emitted, _ = run(dedup, [candidate("a", "acme"), candidate("a", "globex")])
    assert emitted == [b"acme/a", b"globex/a"]


def test_nothing_is_marked_seen_until_the_transaction_has_committed() -> None:
    """decide() leaves the table alone: an aborted transaction leaves every id new for the replayed batch."""
    store: dict[bytes, Any] = {}
    dedup, _ = make(store)
    verdicts = dedup.decide([candidate("a")], 1_000)
    assert store == {} and len(verdicts.emit) == 1
    dedup.remember_emitted(verdicts.emit, 2, 1_000)
    assert store == {b"acme/a": (DONE, 1_000, 2)}  # a tuple: the garbage collector does not track it
    assert orjson.loads(Deduplicator.entry(2, 1_000)) == [DONE, 1_000, 2]


def test_an_entry_left_pending_by_the_earlier_design_is_not_seen() -> None:
    """A PENDING entry (written before transactions) may never have been emitted: its id is emitted."""
    dedup, _ = make({b"acme/a": [PENDING, 10**13, 0]})
    emitted, _ = run(dedup, [candidate("a")])
    assert emitted == [b"acme/a"]


def test_a_reemit_replay_emits_a_seen_id_once_more() -> None:
    """replay --reemit: an id already seen is emitted again, once per batch."""
    dedup, _ = make({})
    run(dedup, [candidate("a")])
    emitted, (_, dropped) = run(dedup, [candidate("a"), candidate("a")], reemit=True)
    assert (emitted, dropped) == ([b"acme/a"], 1)


def test_entries_older_than_the_window_expire_with_a_tombstone() -> None:
    """Faust tables have no TTL: expire() deletes old ids locally and writes a tombstone to the changelog,
    at most one expiry bucket (dedup.expire_every, 60 s here) after the window."""
    store: dict[bytes, Any] = {b"acme/old": [DONE, 0, 3], b"acme/new": [DONE, 10**15, 1]}
    dedup, changelog = make(store)
    assert asyncio.run(dedup.expire(now_ms=int(WINDOW_S * 1000) + 1)) == 0  # its bucket is not over yet
    assert asyncio.run(dedup.expire(now_ms=int(WINDOW_S * 1000) + 60_000)) == 1
    assert list(store) == [b"acme/new"]
    assert changelog.records == [(b"acme/old", None, 3)]


def test_an_expired_id_is_new_again() -> None:
    """After the window an id is emitted again: the window bounds the guarantee (architecture.md)."""
    store: dict[bytes, Any] = {b"acme/a": [DONE, 0, 0]}
    dedup, _ = make(store)
    emitted, _ = run(dedup, [candidate("a")])
    assert emitted == [b"acme/a"]


def test_the_rocksdb_store_keeps_the_same_entries_as_memory(tmp_path: Path) -> None:
    """dedup.store = "rocksdb://": the same verdicts, entries readable back, expiry deletes them."""
    store = open_store("rocksdb://", tmp_path)
    dedup, changelog = make(store)
    assert run(dedup, [candidate("a"), candidate("b")])[1] == (2, 0)
    assert run(dedup, [candidate("a")])[1] == (0, 1)
    assert {k: v[0] for k, v in store.items()} == {b"acme/a": DONE, b"acme/b": DONE}
    assert store.pop(b"acme/b")[0] == DONE and store.get(b"acme/b") is None
    assert asyncio.run(dedup.expire(now_ms=10**15)) == 1
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
    dedup, changelog = make(store)  # type: ignore[arg-type]
    store.armed = True
    assert asyncio.run(dedup.expire(now_ms=now)) == 1000
    assert store.gets == 1000
    assert len(store) == 100_000 and len(changelog.records) == 1000


def test_new_ids_are_indexed_by_time_and_expire_once_their_bucket_is_past_the_window() -> None:
    """An id emitted now is expired by a call one window + one bucket later, and only then."""
    store: dict[bytes, Any] = {}
    dedup, _ = make(store)
    run(dedup, [candidate("a")])
    first_seen = store[b"acme/a"][1]
    assert asyncio.run(dedup.expire(now_ms=first_seen + int(WINDOW_S * 1000) - 1)) == 0
    assert asyncio.run(dedup.expire(now_ms=first_seen + int(WINDOW_S * 1000) + 60_000)) == 1
    assert store == {}

"""The dedup check-and-set (pipeline/stream/dedup.py) and its compact table, driven directly: the changelog
records it writes and restores from, expiry, and the checkpoint files. The transaction that makes an
emission and its entry atomic is tested on the broker (test_exactly_once.py, test_scale_out.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from pipeline.stream.dedup import (
    CHANGELOG_MAGIC,
    CHANGELOG_RECORD_IDS,
    DONE,
    PENDING,
    Candidate,
    Deduplicator,
)
from pipeline.stream.dedup_checkpoint import CheckpointStore, Identity, StoreLocked
from pipeline.stream.fingerprint_table import FingerprintTable, fingerprint

WINDOW_S = 3600.0
WINDOW_MS = int(WINDOW_S * 1000)


def candidate(event_id: str, tenant: str = "acme") -> Candidate:
    return (f"{tenant}/{event_id}".encode(), b"acme/u1", orjson.dumps({"event_id": event_id}))


def run(
    dedup: Deduplicator, batch: list[Candidate], reemit: bool = False, partition: int = 0, now_ms: int = 0
) -> tuple[list[bytes], tuple[int, int]]:
    """One batch of a keyed partition as the stage runs it: decide, then (the transaction committed)
    remember the emitted ids."""
    now_ms = now_ms or int(time.time() * 1000)
    verdicts = dedup.decide(partition, batch, now_ms, reemit)
    dedup.remember_emitted(partition, verdicts.fingerprints, now_ms)
    return [c[0] for c in verdicts.emit], (len(verdicts.emit), verdicts.duplicates)


def test_first_copy_wins_and_later_copies_are_dropped() -> None:
    """Within the window the first emission of (tenant, event_id) wins; repeats are counted, not emitted."""
    dedup = Deduplicator(WINDOW_S)
    emitted, (n, dropped) = run(dedup, [candidate("a"), candidate("a"), candidate("b")])
    assert (emitted, n, dropped) == ([b"acme/a", b"acme/b"], 2, 1)
    emitted, (n, dropped) = run(dedup, [candidate("a")])
    assert (emitted, n, dropped) == ([], 0, 1)


def test_the_same_id_from_two_tenants_is_two_events() -> None:
    """The key is (tenant, event_id): another tenant's id never collides."""
    emitted, _ = run(Deduplicator(WINDOW_S), [candidate("a", "acme"), candidate("a", "globex")])
    assert emitted == [b"acme/a", b"globex/a"]


def test_nothing_is_marked_seen_until_the_transaction_has_committed() -> None:
    """decide() leaves the table alone: an aborted transaction leaves every id new for the replayed batch."""
    dedup = Deduplicator(WINDOW_S)
    verdicts = dedup.decide(2, [candidate("a")], 1_000_000)
    assert len(dedup) == 0 and len(verdicts.emit) == 1
    assert dedup.decide(2, [candidate("a")], 1_000_000).emit == verdicts.emit
    dedup.remember_emitted(2, verdicts.fingerprints, 1_000_000)
    assert len(dedup.table(2)) == 1 and dedup.decide(2, [candidate("a")], 1_000_000).duplicates == 1


def test_a_reemit_replay_emits_a_seen_id_once_more() -> None:
    """replay --reemit: an id already seen is emitted again, once per batch."""
    dedup = Deduplicator(WINDOW_S)
    run(dedup, [candidate("a")])
    emitted, (_, dropped) = run(dedup, [candidate("a"), candidate("a")], reemit=True)
    assert (emitted, dropped) == ([b"acme/a"], 1)


def test_an_id_is_held_the_whole_window_and_is_new_again_after_it() -> None:
    """An id first seen at t is a duplicate until t + window and new again from then on (the window bounds
    the guarantee, docs/architecture.md); expiry deletes it one time bucket (60 s) later at most."""
    dedup = Deduplicator(WINDOW_S)
    first = 1_700_000_000_000
    run(dedup, [candidate("a")], now_ms=first)
    assert run(dedup, [candidate("a")], now_ms=first + WINDOW_MS - 1)[1] == (0, 1)
    fresh = Deduplicator(WINDOW_S)
    run(fresh, [candidate("a")], now_ms=first)
    assert run(fresh, [candidate("a")], now_ms=first + WINDOW_MS)[0] == [b"acme/a"]
    assert dedup.expire(now_ms=first + WINDOW_MS - 1) == 0
    assert dedup.expire(now_ms=first + WINDOW_MS + 60_000) == 1
    assert len(dedup) == 0


def test_expiry_visits_only_the_buckets_that_expire() -> None:
    """With 200,000 live ids and 1,000 expired ones, expire() deletes the 1,000 and leaves the others
    alone, without a look at the live ids' time buckets."""
    table = FingerprintTable(bucket_s=60)
    table.add_all(b"".join(os.urandom(16) for _ in range(1_000)), 1_000)
    table.add_all(b"".join(os.urandom(16) for _ in range(200_000)), 1_000_000)
    live = [g for g in table.generations if g * 60 >= 1_000_000 - 60]
    assert table.expire(cutoff_s=500_000, limit=10**9) == 1_000
    assert len(table) == 200_000 and [g for g in table.generations] == live


def test_the_table_keeps_every_id_through_its_splits() -> None:
    """A table grows from 64 buckets to thousands by splitting; every id stays findable, new ones are not."""
    table = FingerprintTable()
    ids = [os.urandom(16) for _ in range(100_000)]
    for n, fp in enumerate(ids):
        table.add(fp, 10 + n // 1000)
    assert len(table.buckets) >= 1024
    assert all(table.holds(fp, 9) for fp in ids)
    assert not any(table.holds(os.urandom(16), 0) for _ in range(1000))
    assert table.expire(cutoff_s=10 + 49, limit=10**9) == 50_000  # time buckets listed before the splits
    assert sum(table.holds(fp, 0) for fp in ids) == 50_000


def test_fingerprints_are_128_bits_of_the_dedup_key() -> None:
    """A fingerprint is fixed-size, stable across processes and releases (BLAKE2b-128 of the key)."""
    assert fingerprint(b"acme/a") == bytes.fromhex(
        "5113ac642cf9d79ac1a5c2dad965915d"
    )  # changelogs depend on it
    assert fingerprint(b"acme/a") != fingerprint(b"globex/a")


def test_a_transaction_s_new_ids_are_binary_changelog_records_that_restore_them() -> None:
    """The ids of one transaction share their time and partition: a binary record of their fingerprints,
    keyed by the keyed partition and the transaction's first input offset; a restore rebuilds them."""
    now = int(time.time() * 1000)
    writer = Deduplicator(WINDOW_S)
    verdicts = writer.decide(4, [candidate("a"), candidate("b"), candidate("a", "globex")], now)
    records = Deduplicator.changelog_records(verdicts.fingerprints, 4, now, 77)
    assert [key for key, _ in records] == [b"ids:4:77:0"]
    assert records[0][1].startswith(CHANGELOG_MAGIC) and len(records[0][1]) == 16 + 3 * 16
    restored = Deduplicator(WINDOW_S)
    assert restored.restore(4, *records[0], now_ms=now) == 3
    assert run(restored, [candidate("a"), candidate("c")], partition=4)[0] == [b"acme/c"]


def test_a_large_transaction_s_ids_are_split_into_records_under_kafka_s_limit() -> None:
    """A changelog record stays under Kafka's default 1 MiB record limit whatever a batch holds."""
    fps = [fingerprint(b"acme/%d" % n) for n in range(CHANGELOG_RECORD_IDS * 2 + 5)]
    records = Deduplicator.changelog_records(fps, 0, 1_000, 5)
    assert [key for key, _ in records] == [b"ids:0:5:0", b"ids:0:5:1", b"ids:0:5:2"]
    assert all(len(value) < 1_000_000 for _, value in records)
    restored = Deduplicator(WINDOW_S)
    assert sum(restored.restore(0, key, value, now_ms=1_000) for key, value in records) == len(fps)


def test_a_restore_skips_ids_past_the_window_and_reads_the_layouts_of_earlier_releases() -> None:
    """Records past the window are not restored; JSON id lists, per-id entries and their tombstones written
    by earlier releases still apply, in offset order (PENDING entries never were emitted: not seen)."""
    dedup = Deduplicator(WINDOW_S)
    now = 1_700_000_000_000
    old = Deduplicator.changelog_records([fingerprint(b"acme/old")], 0, now - WINDOW_MS, 1)[0]
    assert dedup.restore(0, *old, now_ms=now) == 0
    listed = orjson.dumps({"first_seen_ms": now - 5, "partition": 2, "ids": ["acme/l1", "acme/l2"]})
    assert dedup.restore(2, b"ids:2:7:0", listed, now) == 2
    assert dedup.restore(2, b"acme/x", orjson.dumps([DONE, now - 5, 2]), now) == 1
    assert dedup.restore(2, b"acme/y", orjson.dumps([DONE, now - 5, 2]), now) == 1
    assert dedup.restore(2, b"acme/y", None, now) == 0  # its tombstone
    assert dedup.restore(2, b"acme/z", orjson.dumps([DONE, 0, 2]), now) == 0  # expired
    assert dedup.restore(2, b"acme/p", orjson.dumps([PENDING, now - 5, 2]), now) == 0
    batch = [candidate(e) for e in ("l1", "l2", "x", "y", "z", "p")]
    assert run(dedup, batch, partition=2, now_ms=now)[0] == [b"acme/y", b"acme/z", b"acme/p"]


IDENTITY = Identity(app_id="app", changelog_topic="app-dedup-changelog", partitions=12, bucket_s=60)


def checkpoints(path: Path, identity: Identity = IDENTITY) -> CheckpointStore:
    store = CheckpointStore(path)
    store.identity = identity
    return store


def test_a_checkpoint_gives_back_the_table_and_its_changelog_offset(tmp_path: Path) -> None:
    """Written and read back: the same ids (and only those), the offset, and expiry still works on it."""
    dedup = Deduplicator(WINDOW_S)
    run(dedup, [candidate(f"e{n}") for n in range(5_000)], partition=3, now_ms=1_700_000_000_000)
    store = checkpoints(tmp_path)
    store.write(3, dedup.table(3).to_parts(), 1234)
    found = store.read(3)
    assert found is not None and found.offset == 1234 and len(found.table) == 5_000
    loaded = Deduplicator(WINDOW_S)
    loaded.tables[3] = found.table
    assert run(loaded, [candidate("e1"), candidate("new")], partition=3, now_ms=1_700_000_000_000)[0] == [
        b"acme/new"
    ]
    assert loaded.expire(now_ms=1_700_000_000_000 + WINDOW_MS + 60_000) == 5_001
    store.close()


def test_a_torn_or_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    """A file cut short (SIGKILL while writing, before the rename), a flipped byte, another app id, another
    partition count or another partition: never trusted (the partition is restored from the changelog)."""
    dedup = Deduplicator(WINDOW_S)
    run(dedup, [candidate(f"e{n}") for n in range(1_000)], partition=1)
    store = checkpoints(tmp_path)
    store.write(1, dedup.table(1).to_parts(), 10)
    path = store.path(1)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert store.read(1) is None
    path.write_bytes(whole[:100] + bytes([whole[100] ^ 1]) + whole[101:])
    assert store.read(1) is None
    path.write_bytes(whole)
    assert store.read(1) is not None
    store.close()
    for other in (
        Identity("other-app", IDENTITY.changelog_topic, 12, 60),
        Identity(IDENTITY.app_id, IDENTITY.changelog_topic, 24, 60),
        IDENTITY,
    ):
        reader = checkpoints(tmp_path, other)
        if other is IDENTITY:
            path.rename(reader.path(2))
            assert reader.read(2) is None  # partition 1's table under partition 2's name
        else:
            assert reader.read(1) is None
        reader.close()


def test_a_second_owner_of_a_data_dir_fails_and_leaves_the_first_one_s_checkpoints_alone(
    tmp_path: Path,
) -> None:
    """The dedup state directory has one owner: a second opener gets StoreLocked."""
    owner = checkpoints(tmp_path)
    with pytest.raises(StoreLocked, match="in use by pid"):
        CheckpointStore(tmp_path)
    owner.close()
    CheckpointStore(tmp_path).close()

"""Stage 2, dedup: the keyed topic -> events.canonical, dropping repeats of (tenant, event_id) in the window.

The stage owns the dedup tables of the keyed partitions it is assigned: on assignment each is loaded from
its local checkpoint and the changelog written after it, or restored (read_committed) from the whole
changelog when no checkpoint can be trusted; written through to the changelog in the same Kafka
transaction as the canonical events and the input offsets (pipeline.stream.transactions), one
transaction per keyed partition and batch, whose new ids are one changelog record
(Deduplicator.changelog_records); checkpointed every dedup.checkpoint_every and when the worker stops.
Readers of events.canonical must read with isolation.level=read_committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mode
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from pipeline.config import Settings
from pipeline.records import KeyedBatch, Origin, ReplayTag
from pipeline.stream.changelog_reader import ChangelogReader, ChangelogRecord
from pipeline.stream.consuming import (
    StageProgress,
    guard,
    process_then_commit,
    record_lag,
    stage_consumer,
    stop_consumer,
    stopped_quietly,
)
from pipeline.stream.dedup import Deduplicator
from pipeline.stream.dedup_checkpoint import CheckpointStore, Identity
from pipeline.stream.metrics import WorkerMetrics
from pipeline.stream.record_outcomes import refused_event_letter
from pipeline.stream.transactions import Output, PartitionTransactions

log = logging.getLogger(__name__)

EXPIRE_CHUNK = 50_000  # keys expired under the lock at a time


class DedupStage(mode.Service):
    """Stage 2: the keyed topic, a plain aiokafka consumer, and the dedup table's partitions it owns.

    The rules (docs/decisions/0001-explicit-stage-loops.md, 0003-dedup-state.md):
    - on assignment, the table entries of newly assigned partitions are restored from the changelog
      (partition p of the changelog holds the entries of keyed partition p); entries of partitions no
      longer owned are dropped;
    - records fetched across a rebalance are not processed but fetched again under the new assignment;
    - per keyed partition, a batch's canonical events, changelog entries and input offsets are one
      transaction of that partition's producer, created on assignment (so it fences an earlier owner);
      the table is written only once the transaction has committed.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: WorkerMetrics,
        progress: StageProgress,
        on_death: Callable[[BaseException], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.metrics = metrics
        self.progress = progress
        self.on_death = on_death
        metrics.watch(progress.name, progress.seconds_since_commit)
        self.changelog_topic = changelog_topic(settings)
        if settings.dedup.store.startswith("rocksdb:"):
            log.warning("dedup.store = rocksdb:// is no longer needed: the compact table is used")
        self.dedup = Deduplicator(
            settings.dedup.window.total_seconds(), bucket_s=settings.dedup.expire_every.total_seconds()
        )
        self.checkpoints = CheckpointStore(settings.worker.data_dir / settings.worker.app_id / "dedup")
        self.checkpointed: dict[int, tuple[int, int]] = {}  # partition -> (changelog offset, ids) written
        # Per owned keyed partition: the changelog offset its table holds everything before.
        self.changelog_position: dict[int, int] = {}
        self.group_id = f"{settings.worker.app_id}-dedup"
        self.transactions = PartitionTransactions(settings, self.group_id)
        metrics.dedup_entries.set_function(lambda: len(self.dedup))
        self.lock = asyncio.Lock()  # one batch, restore, expiry or checkpoint at a time
        self.owned: set[int] = set()
        self.unsynced: set[int] = set()  # partitions whose table may lack a transaction's ids
        self.generation = 0

    async def on_start(self) -> None:
        self.consumer = stage_consumer(self.settings, "dedup", "dedup", sticky=True)
        self.consumer.subscribe([self.settings.topics.keyed], listener=_Rebalance(self))
        await self.consumer.start()
        self.add_future(guard(self.progress.name, self._consume(self.consumer), self.on_death))
        self.add_future(guard("dedup expiry", self._expire_periodically(), self.on_death))
        self.add_future(guard("dedup checkpoints", self._checkpoint_periodically(), self.on_death))

    async def on_stop(self) -> None:
        """Checkpoint the tables while the partitions are still ours, then leave the group, so that no
        rebalance reaches the producers and the tables as they close."""
        try:
            await self.checkpoint()
        except Exception:  # noqa: BLE001 - the next start restores from the changelog instead
            log.exception("dedup: the checkpoint at stop failed")
        await stop_consumer(self.consumer)

    async def on_shutdown(self) -> None:
        """Close the transactional producers and the checkpoint directory once the loops have ended."""
        await self.transactions.close()
        self.checkpoints.close()

    async def _checkpoint_periodically(self) -> None:
        """Checkpoint the owned tables every dedup.checkpoint_every, so a restart reads a short tail."""
        every_s = self.settings.dedup.checkpoint_every.total_seconds()
        while not self.should_stop:
            await self.sleep(every_s)
            if self.should_stop:
                return
            try:
                await self.checkpoint()
            except Exception:  # noqa: BLE001 - housekeeping; the previous checkpoint stays valid
                log.exception("dedup: checkpoint failed")

    async def checkpoint(self) -> None:
        """Write each owned table with the changelog offset it is complete up to: copied under the lock
        (no batch in flight, every committed id in its table), written to disk off the event loop."""
        checkpoints = self.checkpoints
        async with self.lock:
            snapshot = [
                (p, self.dedup.table(p).to_parts(), self.changelog_position[p])
                for p in sorted(self.owned)
                if p in self.changelog_position
                and self.checkpointed.get(p) != (self.changelog_position[p], len(self.dedup.table(p)))
            ]
            for p, _, offset in snapshot:
                self.checkpointed[p] = (offset, len(self.dedup.table(p)))
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        written = 0
        for partition, table, offset in snapshot:
            written += await loop.run_in_executor(None, checkpoints.write, partition, table, offset)
        if snapshot:
            log.info(
                "dedup: checkpointed keyed partitions %s (%d bytes) in %.1fs",
                [p for p, _, _ in snapshot],
                written,
                time.monotonic() - started,
            )

    async def _expire_periodically(self) -> None:
        """Delete ids older than the window every dedup.expire_every (Faust tables have no TTL)."""
        every_s = self.settings.dedup.expire_every.total_seconds()
        while not self.should_stop:
            await self.sleep(every_s)
            if self.should_stop:
                return
            try:
                removed = 0
                while True:  # in chunks, releasing the lock between them so batches go on
                    async with self.lock:
                        chunk = self.dedup.expire(limit=EXPIRE_CHUNK)
                    removed += chunk
                    if chunk < EXPIRE_CHUNK:
                        break
                if removed:
                    log.info("dedup: expired %d ids older than %s", removed, self.settings.dedup.window)
            except Exception:  # noqa: BLE001 - expiry is housekeeping; try again next tick
                log.exception("dedup expiry failed")

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        settings = self.settings
        with stopped_quietly(self):
            while not self.should_stop:
                generation = self.generation
                batch = await consumer.getmany(
                    timeout_ms=int(settings.worker.batch_within_s * 1000) or 1,
                    max_records=settings.worker.batch_max,
                )
                if not batch:
                    record_lag(self.metrics, consumer, batch, self.progress)
                    continue
                async with self.lock:
                    if generation != self.generation:
                        # A rebalance happened during the fetch: these records may be from before or after
                        # it. Fetch them again under the current assignment (a repeat is only a duplicate).
                        assignment = consumer.assignment()
                        for tp, part in batch.items():
                            if tp in assignment:
                                consumer.seek(tp, part[0].offset)
                        continue
                    record_lag(self.metrics, consumer, batch, self.progress)
                    await process_then_commit(
                        consumer,
                        batch,
                        self.dedup_batch,
                        self.progress,
                        self.metrics,
                        settings.worker.isolate_after_failures,
                        self._quarantine,
                        commits_itself=True,  # the offsets go in each partition's transaction
                    )

    async def dedup_batch(self, records: Sequence[Any]) -> None:
        """Dedup per keyed partition, concurrently; each partition's records in runs of one replay tag
        (a replay's runs are reported), each run one transaction that also commits its offsets."""
        by_partition: dict[int, list[Any]] = defaultdict(list)
        for record in records:
            by_partition[record.partition].append(record)
        outcomes = await asyncio.gather(
            *(self._dedup_partition(p, part) for p, part in by_partition.items()), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise failures[0]

    async def _dedup_partition(self, partition: int, records: list[Any]) -> None:
        if partition in self.unsynced:
            await self.transactions.ensure(partition)  # NotOwned while its re-creation backs off
            await self._resync(partition)
            self.unsynced.discard(partition)
        for replay, run in _runs(records):
            batch = [entry for record in run for entry in KeyedBatch.entries(record.value)]
            now_ms = int(time.time() * 1000)
            verdicts = self.dedup.decide(partition, batch, now_ms, reemit=bool(replay and replay.reemit))
            changelog = Deduplicator.changelog_records(
                verdicts.fingerprints, partition, now_ms, run[0].offset
            )
            outputs: list[Output] = [(self.changelog_topic, key, ids, partition) for key, ids in changelog]
            canonical = self.settings.topics.canonical
            outputs += [(canonical, c[1], c[2], None) for c in verdicts.emit]
            if replay is not None:
                report = {
                    "replay_id": replay.replay_id,
                    "batches": len(run),
                    "canonical": len(verdicts.emit),
                    "duplicates": verdicts.duplicates,
                }
                outputs.append(
                    (
                        self.settings.topics.replay_results,
                        replay.replay_id.encode(),
                        orjson.dumps(report),
                        None,
                    )
                )
            offsets = {TopicPartition(run[-1].topic, partition): run[-1].offset + 1}
            try:
                written = await self.transactions.commit(partition, outputs, offsets)
            except BaseException:
                self.unsynced.add(partition)  # it may have committed: re-sync before deciding again
                raise
            self.dedup.remember_emitted(partition, verdicts.fingerprints, now_ms)
            end = written.get((self.changelog_topic, partition))
            if end is not None:
                self.changelog_position[partition] = end
            self.metrics.canonical.inc(len(verdicts.emit))
            for record in run:  # receipt -> committed, per source (headwater_worker_freshness_seconds)
                self.metrics.committed(record.headers or ())
            self.metrics.duplicates.inc(verdicts.duplicates)

    async def _quarantine(self, record: Any, exc: BaseException) -> None:
        """Dead-letter each event of a keyed record whose canonical sends Kafka refused even alone.

        The letter's body is the canonical event (the raw request went through normalize already) and its
        origin the keyed record; `dlq redrive` sends it back to the keyed topic (record_outcomes)."""
        keyed = Origin(topic=record.topic, partition=record.partition, offset=record.offset)
        detail = (
            "Kafka refused this canonical event while the events around it went through: "
            f"{type(exc).__name__}: {exc}"
        )
        outputs: list[Output] = []
        for index, (_, _, event) in enumerate(KeyedBatch.entries(record.value)):
            letter = refused_event_letter(keyed, index, event, detail)
            outputs.append((self.settings.topics.dlq, letter.id.encode(), letter.to_json(), None))
        offsets = {TopicPartition(record.topic, record.partition): record.offset + 1}
        await self.transactions.commit(record.partition, outputs, offsets)

    async def assigned(self, partitions: set[int]) -> None:
        """Own exactly these keyed partitions: restore the new ones, forget the others."""
        async with self.lock:
            self.generation += 1
            new = partitions - self.owned
            for partition in list(self.dedup.tables):
                if partition not in partitions or partition in new:  # a table of earlier ownership is stale
                    self.dedup.drop(partition)
                    self.changelog_position.pop(partition, None)
                    self.checkpointed.pop(partition, None)
            started = time.monotonic()
            self.progress.restoring = True
            try:
                # Before the restore: fences a zombie's writes. A partition whose producer could not be
                # created is re-synced once it is, since a zombie's transaction may still commit.
                failed = await self.transactions.own(partitions)
                self.unsynced = (self.unsynced & partitions) | failed
                restored = await self._restore(new) if new else Restored()
            finally:
                self.progress.restored()
            self.owned = set(partitions)
            log.info(
                "dedup: own keyed partitions %s; restored %s: %d ids from checkpoints (%s), %d ids from "
                "%d changelog records, in %.1fs",
                sorted(partitions),
                sorted(new),
                restored.from_checkpoints,
                sorted(restored.checkpointed),
                restored.from_changelog,
                restored.records,
                time.monotonic() - started,
            )

    def _check_checkpoints_against(self, consumer: AIOKafkaConsumer) -> CheckpointStore:
        """The checkpoint directory, with what a checkpoint must match (the keyed topic's partition count
        from the consumer's metadata: ids map to partitions by it)."""
        if self.checkpoints.identity is None:
            keyed = self.settings.topics.keyed
            self.checkpoints.identity = Identity(
                app_id=self.settings.worker.app_id,
                changelog_topic=self.changelog_topic,
                partitions=len(consumer.partitions_for_topic(keyed) or ()),
                bucket_s=self.dedup.bucket_s,
            )
        return self.checkpoints

    async def _restore(self, partitions: set[int]) -> Restored:
        """Load each partition's table: its checkpoint and the changelog after it, or the whole changelog
        when the checkpoint is missing, torn, foreign, ahead of the changelog's end or behind its start
        (retention deleted records it does not hold). Read to the end offsets as of now."""
        checkpoints = self._check_checkpoints_against(self.consumer)
        restored = Restored()
        async with ChangelogReader(self.settings, self.changelog_topic) as reader:
            bounds = await reader.bounds(partitions)
            loop = asyncio.get_running_loop()
            positions: dict[int, int] = {}
            for partition, (start, end) in bounds.items():
                found = await loop.run_in_executor(None, checkpoints.read, partition)
                if found is not None and not start <= found.offset <= end:
                    log.warning(
                        "dedup: the checkpoint of keyed partition %d is at changelog offset %d, outside "
                        "%d..%d (retention passed it, or the changelog was recreated); restoring from the "
                        "whole changelog",
                        partition,
                        found.offset,
                        start,
                        end,
                    )
                    found = None
                self.dedup.drop(partition)
                if found is None:
                    positions[partition] = start
                else:
                    self.dedup.tables[partition] = found.table
                    positions[partition] = found.offset
                    restored.checkpointed.append(partition)
                    restored.from_checkpoints += len(found.table)
            ends = {p: end for p, (_, end) in bounds.items()}
            held = await reader.read(positions, ends)
        self._apply(held, restored)
        self.changelog_position.update(ends)
        return restored

    def _apply(self, held: dict[int, list[ChangelogRecord]], restored: Restored) -> None:
        """Apply each partition's changelog records in order, its table first sized for their ids (no
        splits while it fills)."""
        now_ms = int(time.time() * 1000)
        for partition, records in held.items():
            table = self.dedup.table(partition)
            table.reserve(len(table) + sum(Deduplicator.restored_ids(value) for _, value in records))
            restored.records += len(records)
            for key, value in records:
                restored.from_changelog += self.dedup.restore(partition, key, value, now_ms)
            records.clear()

    async def _resync(self, partition: int) -> None:
        """After a transaction of the partition failed, ambiguously perhaps (its commit may have gone
        through), read what the changelog holds past the table before deciding again: a replayed batch
        whose ids did get committed is then dropped, not emitted twice."""
        restored = Restored()
        async with ChangelogReader(self.settings, self.changelog_topic) as reader:
            ends = await reader.settled_ends([partition])
            start = self.changelog_position.get(partition, 0)
            held = await reader.read({partition: start}, ends)
        self._apply(held, restored)
        self.changelog_position[partition] = ends[partition]
        log.info(
            "dedup: keyed partition %d re-synced from the changelog after a failed transaction: %d ids "
            "from %d records",
            partition,
            restored.from_changelog,
            restored.records,
        )


@dataclass
class Restored:
    """What a restore loaded: ids from checkpoints (of which partitions) and from changelog records."""

    from_checkpoints: int = 0
    checkpointed: list[int] = field(default_factory=list)
    from_changelog: int = 0
    records: int = 0


def _runs(records: list[Any]) -> list[tuple[ReplayTag | None, list[Any]]]:
    """Consecutive records of one partition that share a replay tag, in offset order."""
    runs: list[tuple[ReplayTag | None, list[Any]]] = []
    for record in records:
        tag = ReplayTag.from_headers(record.headers)
        if runs and runs[-1][0] == tag:
            runs[-1][1].append(record)
        else:
            runs.append((tag, [record]))
    return runs


def changelog_config(settings: Settings) -> dict[str, str]:
    """Time-limited: a segment is rolled every hour and deleted by the broker once its newest record is
    older than the window + 1 h, so the changelog holds at most the window + 2 h. Compacted as well, as
    changelogs are (docs/pitfalls.md): the per-id entries of earlier releases still collapse to one per id."""
    retention_ms = int(settings.dedup.window.total_seconds() * 1000) + 3_600_000
    return {"cleanup.policy": "compact,delete", "retention.ms": str(retention_ms), "segment.ms": "3600000"}


def changelog_topic(settings: Settings) -> str:
    """The compacted topic that holds the dedup table of one app id."""
    return f"{settings.worker.app_id}-dedup-changelog"


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: DedupStage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.stage.lock:  # wait for the batch in flight (it commits)
            self.stage.generation += 1

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.stage.assigned({tp.partition for tp in assigned})

"""Stage 2, dedup: the keyed topic -> events.canonical, dropping repeats of (tenant, event_id) in the window.

The stage owns the dedup table's entries of the keyed partitions it is assigned: restored (read_committed)
from the changelog on assignment, written through to it in the same Kafka transaction as the canonical
events and the input offsets (pipeline.stream.transactions), one transaction per keyed partition and
batch, whose new ids are one changelog record (Deduplicator.changelog_records). Readers of
events.canonical must read with isolation.level=read_committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import mode
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer
from pipeline.records import KeyedBatch, Origin, ReplayTag
from pipeline.stream.consuming import (
    StageProgress,
    guard,
    process_then_commit,
    record_lag,
    stage_consumer,
    stop_consumer,
    stopped_quietly,
)
from pipeline.stream.dedup import Deduplicator, Store, entry_partition, open_store
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
        self.store: Store = open_store(
            settings.dedup.store, settings.worker.data_dir / settings.worker.app_id
        )
        self.dedup = Deduplicator(
            self.store,
            settings.dedup.window.total_seconds(),
            bucket_s=settings.dedup.expire_every.total_seconds(),
        )
        self.group_id = f"{settings.worker.app_id}-dedup"
        self.transactions = PartitionTransactions(settings, self.group_id)
        metrics.dedup_entries.set_function(lambda: len(self.store))
        self.lock = asyncio.Lock()  # one batch, restore or expiry at a time
        self.owned: set[int] = set()
        self.generation = 0

    async def on_start(self) -> None:
        self.consumer = stage_consumer(self.settings, "dedup", "dedup")
        self.consumer.subscribe([self.settings.topics.keyed], listener=_Rebalance(self))
        await self.consumer.start()
        self.add_future(guard(self.progress.name, self._consume(self.consumer), self.on_death))
        self.add_future(guard("dedup expiry", self._expire_periodically(), self.on_death))

    async def on_stop(self) -> None:
        """Leave the group first, so that no rebalance reaches the producers and the store as they close."""
        await stop_consumer(self.consumer)

    async def on_shutdown(self) -> None:
        """Close the transactional producers and the store once the stage's loops have ended."""
        await self.transactions.close()
        self.store.close()

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
        for replay, run in _runs(records):
            batch = [entry for record in run for entry in KeyedBatch.entries(record.value)]
            now_ms = int(time.time() * 1000)
            verdicts = self.dedup.decide(batch, now_ms, reemit=bool(replay and replay.reemit))
            changelog = Deduplicator.changelog_records(verdicts.emit, partition, now_ms, run[0].offset)
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
            await self.transactions.commit(partition, outputs, offsets)
            self.dedup.remember_emitted(verdicts.emit, partition, now_ms)
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
            store = self.store
            for key in [k for k, entry in store.items() if entry_partition(entry) not in partitions - new]:
                del store[key]
            started = time.monotonic()
            await self.transactions.own(partitions)  # before the restore: fences and aborts a zombie's writes
            restored = await self._restore(new) if new else 0
            self.owned = set(partitions)
            log.info(
                "dedup: own keyed partitions %s; restored %d entries of %s in %.1fs",
                sorted(partitions),
                restored,
                sorted(new),
                time.monotonic() - started,
            )

    async def _restore(self, partitions: set[int]) -> int:
        """Read the changelog partitions from the beginning to their current end into the store."""
        topic = self.changelog_topic
        consumer = make_consumer(self.settings, isolation_level="read_committed")
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            restore = self.dedup.restore
            now_ms = int(time.time() * 1000)
            count = 0
            while remaining:
                for tp, part in (
                    await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)
                ).items():
                    for record in part:
                        if record.offset >= ends[tp]:
                            break
                        count += restore(record.key, record.value, now_ms)
                    if part and part[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return count
        finally:
            await consumer.stop()


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

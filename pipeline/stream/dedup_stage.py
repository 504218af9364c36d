"""Stage 2, dedup: the keyed topic -> events.canonical, dropping repeats of (tenant, event_id) in the window.

The stage owns the dedup table's entries of the keyed partitions it is assigned: restored from the
compacted changelog on assignment, written through to it by `Deduplicator` (pipeline.stream.dedup).
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
from aiokafka import ConsumerRebalanceListener, TopicPartition

from pipeline import reasons
from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer, offsets_at, read_topic
from pipeline.records import KeyedBatch, Origin, RawHeaders, RawRecord, ReplayTag, utc_now
from pipeline.stream.consuming import StageProgress, guard, process_then_commit, record_lag, stage_consumer
from pipeline.stream.dedup import Candidate, Deduplicator, Send, Store, entry_partition, open_store
from pipeline.stream.metrics import WorkerMetrics
from pipeline.stream.normalizing import dead_letter

log = logging.getLogger(__name__)

EXPIRE_CHUNK = 50_000  # keys expired under the lock at a time


class DedupStage(mode.Service):
    """Stage 2: the keyed topic, a plain aiokafka consumer, and the dedup table's partitions it owns.

    The rules (docs/decisions/0001-explicit-stage-loops.md, 0003-dedup-state.md):
    - on assignment, the table entries of newly assigned partitions are restored from the changelog
      (partition p of the changelog holds the entries of keyed partition p); entries of partitions no
      longer owned are dropped;
    - records fetched across a rebalance are not processed but fetched again under the new assignment;
    - a batch's changelog writes and canonical events are acknowledged before its offsets are committed.
    """

    def __init__(
        self,
        settings: Settings,
        send: Send,
        metrics: WorkerMetrics,
        progress: StageProgress,
        on_death: Callable[[BaseException], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.send = send
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
            self.changelog_topic,
            settings.dedup.window.total_seconds(),
            send,
            self._find_emitted,
            bucket_s=settings.dedup.expire_every.total_seconds(),
        )
        metrics.dedup_entries.set_function(lambda: len(self.store))
        self.lock = asyncio.Lock()  # one batch, restore or expiry at a time
        self.owned: set[int] = set()
        self.generation = 0

    async def on_start(self) -> None:
        self.add_future(guard(self.progress.name, self._consume(), self.on_death))
        self.add_future(guard("dedup expiry", self._expire_periodically(), self.on_death))

    async def on_stop(self) -> None:
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    async def _expire_periodically(self) -> None:
        """Delete ids older than the window every dedup.expire_every (Faust tables have no TTL)."""
        every_s = self.settings.dedup.expire_every.total_seconds()
        while not self.should_stop:
            await self.sleep(every_s)
            try:
                removed = 0
                while True:  # in chunks, releasing the lock between them so batches go on
                    async with self.lock:
                        chunk = await self.dedup.expire(limit=EXPIRE_CHUNK)
                    removed += chunk
                    if chunk < EXPIRE_CHUNK:
                        break
                if removed:
                    log.info("dedup: expired %d ids older than %s", removed, self.settings.dedup.window)
            except Exception:  # noqa: BLE001 - expiry is housekeeping; try again next tick
                log.exception("dedup expiry failed")

    async def _consume(self) -> None:
        settings = self.settings
        consumer = stage_consumer(settings, "dedup", "dedup")
        consumer.subscribe([settings.topics.keyed], listener=_Rebalance(self))
        await consumer.start()
        try:
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
                    )
        finally:
            await consumer.stop()

    async def dedup_batch(self, records: Sequence[Any]) -> None:
        """Dedup per keyed partition; a replay's batches run alone so their outcome can be reported."""
        groups: dict[tuple[int, ReplayTag | None], list[Any]] = defaultdict(list)
        for record in records:
            groups[(record.partition, ReplayTag.from_headers(record.headers))].append(record)
        for (partition, replay), group in groups.items():
            batch: list[tuple[Candidate, int]] = []
            for record in group:
                batch.extend((entry, partition) for entry in KeyedBatch.entries(record.value))
            emitted, dropped = await self.dedup.run(batch, self._emit, reemit=bool(replay and replay.reemit))
            self.metrics.canonical.inc(emitted)
            self.metrics.duplicates.inc(dropped)
            if replay is not None:
                report = orjson.dumps(
                    {
                        "replay_id": replay.replay_id,
                        "batches": len(group),
                        "canonical": emitted,
                        "duplicates": dropped,
                    }
                )
                await self.send(self.settings.topics.replay_results, replay.replay_id.encode(), report, None)

    async def _quarantine(self, record: Any, exc: BaseException) -> None:
        """Dead-letter each event of a keyed record whose canonical sends Kafka refused even alone.

        The letter's body is the canonical event (the raw request went through normalize already); its
        headers name the keyed record, so `dlq show` explains it and `dlq export` keeps the event.
        """
        acks = []
        for index, (_, _, event) in enumerate(KeyedBatch.entries(record.value)):
            fields = orjson.loads(event)
            headers = RawHeaders(
                tenant=str(fields.get("tenant", "unknown")),
                source=str(fields.get("source", "unknown")),
                received_at=fields.get("received_at") or utc_now(),
                request_id=f"{record.topic}:{record.partition}:{record.offset}",
            )
            origin = Origin(topic=record.topic, partition=record.partition, offset=record.offset)
            letter = dead_letter(
                RawRecord(body=event, headers=headers, origin=origin),
                "validate",
                reasons.OUTPUT_REFUSED,
                f"Kafka refused this canonical event while the events around it went through: "
                f"{type(exc).__name__}: {exc}",
                index=index,
            )
            acks.append(await self.send(self.settings.topics.dlq, letter.id.encode(), letter.to_json(), None))
        await asyncio.gather(*acks)

    async def _emit(self, candidates: list[Candidate]) -> None:
        topic = self.settings.topics.canonical
        acks = [await self.send(topic, canonical_key, event, None) for _, canonical_key, event in candidates]
        await asyncio.gather(*acks)

    async def _find_emitted(self, keys: list[bytes], since_ms: int) -> set[bytes]:
        """Which of these dedup keys are already on events.canonical, looking from `since_ms` on."""
        wanted = set(keys)
        starts = await offsets_at(self.settings, self.settings.topics.canonical, since_ms - 5_000)
        found = set()
        for record in await read_topic(self.settings, self.settings.topics.canonical, start=starts):
            try:
                event = orjson.loads(record.value)
                key = f"{event['tenant']}/{event['event_id']}".encode()
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if key in wanted:
                found.add(key)
        return found

    async def assigned(self, partitions: set[int]) -> None:
        """Own exactly these keyed partitions: restore the new ones, forget the others."""
        async with self.lock:
            self.generation += 1
            new = partitions - self.owned
            store = self.store
            for key in [k for k, entry in store.items() if entry_partition(entry) not in partitions - new]:
                del store[key]
            started = time.monotonic()
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
        consumer = make_consumer(self.settings)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            store = self.store
            count = 0
            while remaining:
                for tp, part in (
                    await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)
                ).items():
                    for record in part:
                        if record.offset >= ends[tp]:
                            break
                        if record.value is None:
                            store.pop(record.key, None)
                        else:
                            entry = orjson.loads(record.value)
                            store[record.key] = entry
                            self.dedup.remember(record.key, entry)
                        count += 1
                    if part and part[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return count
        finally:
            await consumer.stop()


def changelog_config(settings: Settings) -> dict[str, str]:
    """Compacted (one entry per id) and time-limited: segments older than the window + 1 h are deleted by
    the broker, so the changelog stays bounded by the window even where a tombstone was never written."""
    retention_ms = int(settings.dedup.window.total_seconds() * 1000) + 3_600_000
    return {"cleanup.policy": "compact,delete", "retention.ms": str(retention_ms)}


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

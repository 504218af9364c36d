"""Faust workers: raw.<source> -> (adapter) -> keyed candidates -> (dedup) -> events.canonical / events.dlq.

Two stages, because dedup must see every copy of an id in one place:
- one *normalize* agent per source adapter reads raw records, turns them into canonical events and dead
  letters (pipeline.normalizing), sends dead letters to events.dlq and packs the events into one
  KeyedBatch per partition of the keyed topic, partitioned by (tenant, event_id);
- one *dedup* stage reads the keyed topic, owns the dedup table's partitions of the keyed partitions it
  is assigned (restored from the compacted changelog on assignment), and emits survivors.
At-least-once: every send of a batch is acknowledged before the batch's offsets may be committed, and no
exception escapes an agent (Faust would ack the record and never retry it: pitfalls.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

import click
import faust
from aiohttp import web
import mode
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
import orjson
from aiokafka.partitioner import murmur2

from adapters import ADAPTERS
from pipeline import reasons
from pipeline.adapting import AdapterModule
from pipeline.config import SOURCES, Settings
from pipeline.dedup import Candidate, Deduplicator, make_store
from pipeline.kafka import ensure_topics, make_consumer, offsets_at, read_topic
from pipeline.normalizing import dead_letter, outcomes
from pipeline.records import CanonicalEvent, DeadLetter, KeyedBatch, Origin, RawHeaders, RawRecord, ReplayTag
from pipeline.metrics import WorkerMetrics

log = logging.getLogger(__name__)


def keyed_partition(dedup_key: bytes, partitions: int) -> int:
    """The keyed-topic partition of an id: Kafka's default murmur2 partitioner, so tools agree."""
    return (murmur2(dedup_key) & 0x7FFFFFFF) % partitions


def raw_record(message: ConsumerRecord[bytes, bytes]) -> RawRecord:
    """A consumed Kafka record as a RawRecord; missing headers raise pydantic.ValidationError."""
    origin = Origin(topic=message.topic, partition=message.partition, offset=message.offset,
                    timestamp_ms=message.timestamp)
    return RawRecord(body=message.value or b"", headers=RawHeaders.from_kafka(message.headers or ()), origin=origin)


class Pipeline:
    """The Faust app and its agents, built from Settings (style.md §2.7: agents in a loop, no logic in them)."""

    def __init__(self, settings: Settings, sources: Sequence[str] = SOURCES,
                 adapters: dict[str, AdapterModule] | None = None) -> None:
        self.settings = settings
        self.sources = list(sources)
        self.adapters = dict(adapters or ADAPTERS)
        self.metrics = WorkerMetrics()
        self.app = self._app()
        self.keyed_partitions = settings.kafka.partitions
        # The dedup table: entries of the keyed partitions this worker owns, restored from the compacted
        # changelog whenever a partition is assigned (DedupStage), written through to it on every change.
        self.store: Any = make_store(settings.dedup.store, settings.worker.data_dir / settings.worker.app_id)
        self.changelog_topic = f"{settings.worker.app_id}-dedup-changelog"
        self.dedup = Deduplicator(self.store, self.changelog_topic, settings.dedup.window.total_seconds(),
                                  self._send, self._find_emitted)
        self.dedup_lock = asyncio.Lock()  # one batch, restore or expiry at a time
        for source in self.sources:
            self._normalize_agent(source)
        if settings.worker.web_port:
            self._web_service()
        pipeline = self

        @self.app.service
        class Dedup(DedupStage):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(pipeline, **kwargs)

        self.app.timer(settings.dedup.expire_every.total_seconds())(self._expire)

    def _app(self) -> faust.App:
        s = self.settings
        brokers = ";".join(f"kafka://{b.strip()}" for b in s.kafka.bootstrap_servers.split(","))
        return faust.App(
            s.worker.app_id,
            broker=brokers,
            store="memory://",  # the worker has no Faust tables (DedupStage keeps its own)
            datadir=str(s.worker.data_dir),
            web_enabled=False,
            topic_partitions=s.kafka.partitions,
            topic_replication_factor=s.kafka.replication_factor,
            topic_allow_declare=True,
            producer_acks=-1,
            producer_linger_ms=5,
            producer_max_batch_size=512 * 1024,
            producer_max_request_size=s.max_record_bytes,
            broker_max_poll_records=s.worker.max_poll_records,
            consumer_max_fetch_size=16 * 1024 * 1024,
            consumer_auto_offset_reset="earliest",
            stream_buffer_maxsize=max(4096, s.worker.batch_max * 2),
            stream_recovery_delay=0.0,
            broker_commit_every=s.worker.batch_max,
            table_standby_replicas=0,
            broker_session_timeout=s.worker.session_timeout_s,
            broker_heartbeat_interval=max(1.0, s.worker.session_timeout_s / 4),
            logging_config=None,
        )

    # --- sending ----------------------------------------------------------------------------------------

    async def _send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None) -> Awaitable[Any]:
        """Hand a record to the producer; returns the future of its ack (awaited per batch, not per record)."""
        return await self.app.producer.send(topic, key, value, partition, None, None)

    async def _send_dead_letters(self, letters: Iterable[DeadLetter], acks: list[Awaitable[Any]]) -> None:
        for letter in letters:
            acks.append(await self._send(self.settings.topics.dlq, letter.id.encode(), letter.to_json(), None))
            self.metrics.dead_letters.labels(letter.source, letter.reason.partition(":")[0]).inc()

    # --- web: /metrics and the DLQ page ----------------------------------------------------------------

    def _web_service(self) -> None:
        """Serve /metrics and the read-only DLQ page (/, /letters/{id}) on worker.web_port."""
        pipeline = self

        @self.app.service
        class Web(mode.Service):
            runner: web.AppRunner | None = None

            async def on_start(self) -> None:
                from pipeline.dlq_page import make_app

                app = make_app(pipeline.settings)
                app.router.add_get("/metrics", pipeline.metrics.handle)
                self.runner = web.AppRunner(app, access_log=None)
                await self.runner.setup()
                await web.TCPSite(self.runner, pipeline.settings.worker.web_host,
                                  pipeline.settings.worker.web_port).start()

            async def on_stop(self) -> None:
                if self.runner is not None:
                    await self.runner.cleanup()

    # --- stage 1: normalize -----------------------------------------------------------------------------

    def _normalize_agent(self, source: str) -> None:
        """Register the normalize stage of one source as a service of the Faust worker."""
        pipeline = self

        @self.app.service
        class Stage(NormalizeStage):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(pipeline, source, **kwargs)

    async def normalize_batch(self, messages: Sequence[Any], adapter: AdapterModule,
                              replay: ReplayTag | None = None) -> tuple[int, int]:
        """Adapter outcomes of every message: dead letters to the DLQ, events packed per keyed partition.

        Returns (keyed records sent, dead letters sent). A replay tags its keyed records.
        """
        acks: list[Awaitable[Any]] = []
        packs: dict[int, KeyedBatch] = defaultdict(KeyedBatch)
        full: list[tuple[int, KeyedBatch]] = []
        letters: list[DeadLetter] = []
        for message in messages:
            self.metrics.raw_records.labels(adapter.SOURCE).inc()
            try:
                raw = raw_record(message)
            except Exception as exc:  # noqa: BLE001 - a record without our headers is still kept
                letters.append(self._foreign_record(message, adapter.SOURCE, exc))
                continue
            for outcome in outcomes(raw, adapter, self.settings.dlq.redrive_limit):
                if isinstance(outcome, CanonicalEvent):
                    partition = keyed_partition(outcome.dedup_key(), self.keyed_partitions)
                    pack = packs[partition]
                    pack.add(outcome)
                    if pack.size >= KeyedBatch.MAX_BYTES:  # keep keyed records well under any size limit
                        full.append((partition, packs.pop(partition)))
                else:
                    letters.append(outcome)
        await self._send_dead_letters(letters, acks)
        headers = replay.to_headers() if replay else None
        for partition, pack in [*full, *packs.items()]:
            acks.append(await self.app.producer.send(self.settings.topics.keyed, None, pack.to_bytes(), partition,
                                                     None, headers))
        await asyncio.gather(*acks)
        return len(full) + len(packs), len(letters)

    def _foreign_record(self, message: Any, source: str, exc: Exception) -> DeadLetter:
        headers = RawHeaders(tenant="unknown", source=source, received_at=_utc_from_ms(message.timestamp),
                             request_id=f"{message.topic}:{message.partition}:{message.offset}")
        origin = Origin(topic=message.topic, partition=message.partition, offset=message.offset)
        raw = RawRecord(body=message.value or b"", headers=headers, origin=origin)
        return dead_letter(raw, "parse", reasons.INVALID_RAW_HEADERS.code,
                           f"the record lacks Headwater's raw headers ({type(exc).__name__}); was it written by the receiver?")

    # --- stage 2: dedup ---------------------------------------------------------------------------------

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
                report = orjson.dumps({"replay_id": replay.replay_id, "batches": len(group),
                                       "canonical": emitted, "duplicates": dropped})
                await self._send(self.settings.topics.replay_results, replay.replay_id.encode(), report, None)

    async def _emit(self, candidates: list[Candidate]) -> None:
        topic = self.settings.topics.canonical
        acks = [await self._send(topic, canonical_key, event, None) for _, canonical_key, event in candidates]
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

    async def _expire(self) -> None:
        try:
            async with self.dedup_lock:
                removed = await self.dedup.expire()
            if removed:
                log.info("dedup: expired %d ids older than %s", removed, self.settings.dedup.window)
        except Exception:  # noqa: BLE001 - expiry is housekeeping; try again next tick
            log.exception("dedup expiry failed")

    # --- running ----------------------------------------------------------------------------------------

    async def prepare_topics(self) -> None:
        topics = self.settings.topics
        await ensure_topics(self.settings, [topics.raw(s) for s in self.sources] + [topics.keyed, topics.canonical,
                                                                                       topics.dlq])
        await ensure_topics(self.settings, [topics.replay_results], partitions=1)
        await ensure_topics(self.settings, [self.changelog_topic], partitions=self.keyed_partitions,
                            config={"cleanup.policy": "compact"})

    def run(self) -> None:
        """Run the worker until SIGINT/SIGTERM."""
        asyncio.run(self.prepare_topics())
        with contextlib.suppress(ImportError):  # uvloop: ~10-20% more events/s for the same CPU
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        worker = faust.Worker(self.app, loglevel="INFO", quiet=True, redirect_stdouts=False)
        worker.execute_from_commandline()


def _utc_from_ms(timestamp_ms: int | None) -> datetime:
    return datetime.fromtimestamp(timestamp_ms / 1000 if timestamp_ms else time.time(), UTC)


class NormalizeStage(mode.Service):
    """Stage 1 for one source: a plain aiokafka consumer in the worker process, batch by batch.

    Why not a Faust agent: Faust's per-record stream machinery caps a process near 4-5k records/s
    (pitfalls.md), and in our SIGKILL test a restarted take_events() agent stopped fetching one
    partition. Here the loop is explicit: poll a batch, normalize it, wait for every output's ack,
    then commit exactly those offsets. A crash before the commit replays the batch (at-least-once);
    dedup and deterministic dead-letter ids absorb the copies.
    """

    def __init__(self, pipeline: Pipeline, source: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.source = source
        self.adapter = pipeline.adapters[source]
        self.settings = pipeline.settings

    async def on_start(self) -> None:
        self.add_future(self._consume())

    async def _consume(self) -> None:
        settings = self.settings
        consumer = stage_consumer(settings, "normalize", self.source, settings.topics.raw(self.source))
        await consumer.start()
        try:
            while not self.should_stop:
                batch = await consumer.getmany(timeout_ms=int(settings.worker.batch_within_s * 1000) or 1,
                                               max_records=settings.worker.batch_max)
                record_lag(self.pipeline.metrics, consumer, batch)
                records = [r for part in batch.values() for r in part]
                if records:
                    await process_then_commit(consumer, batch, self.pipeline.normalize_batch(records, self.adapter),
                                              f"{self.source} batch")
        finally:
            await consumer.stop()


def stage_consumer(settings: Settings, stage: str, name: str, *topics: str) -> Any:
    """The consumer of one worker stage: group <app_id>-<stage>, manual commits, the worker's timeouts."""
    return make_consumer(
        settings, *topics,
        group_id=f"{settings.worker.app_id}-{stage}", client_id=f"{settings.kafka.client_id}-{name}",
        max_poll_records=settings.worker.max_poll_records,
        session_timeout_ms=int(settings.worker.session_timeout_s * 1000),
        heartbeat_interval_ms=int(max(1.0, settings.worker.session_timeout_s / 4) * 1000),
    )


async def process_then_commit(consumer: Any, batch: dict[TopicPartition, list[Any]], processing: Awaitable[Any],
                              what: str) -> None:
    """Await the batch's processing (its outputs acknowledged), then commit exactly its offsets.

    If the outputs were not acknowledged, seek back so the batch is processed again, never skipped. A
    failed commit means the partitions moved to another member, which replays the batch.
    """
    try:
        await processing
    except Exception:  # noqa: BLE001
        log.exception("outputs of a %s were not acknowledged; replaying it", what)
        for tp, part in batch.items():
            consumer.seek(tp, part[0].offset)
        await asyncio.sleep(1.0)
        return
    try:
        await consumer.commit({tp: part[-1].offset + 1 for tp, part in batch.items()})
    except (CommitFailedError, KafkaError) as exc:
        log.warning("commit of a %s failed (%s); the batch will be replayed", what, exc)


def record_lag(metrics: WorkerMetrics, consumer: Any, batch: dict[TopicPartition, list[Any]]) -> None:
    """headwater_worker_consumer_lag: high watermark - position after this batch, per partition."""
    for tp, part in batch.items():
        highwater = consumer.highwater(tp)
        if highwater is not None and part:
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - part[-1].offset - 1))


class DedupStage(mode.Service):
    """Stage 2: the keyed topic, a plain aiokafka consumer, and the dedup table's partitions it owns.

    Why not a Faust agent and Table: in the scale-out test (three workers, one SIGKILLed, one joining)
    Faust's stream committed keyed offsets past records it never handed to the agent after a rebalance,
    and ~900 events were lost (cf. faust-streaming #216). Here the rules are ours and short:
    - on assignment, the table entries of newly assigned partitions are restored from the changelog
      (partition p of the changelog holds the entries of keyed partition p); entries of partitions no
      longer owned are dropped;
    - records fetched across a rebalance are not processed but fetched again under the new assignment;
    - a batch's changelog writes and canonical events are acknowledged before its offsets are committed.
    """

    def __init__(self, pipeline: Pipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.owned: set[int] = set()
        self.generation = 0

    async def on_start(self) -> None:
        self.add_future(self._consume())

    async def _consume(self) -> None:
        settings = self.settings
        consumer = stage_consumer(settings, "dedup", "dedup")
        consumer.subscribe([settings.topics.keyed], listener=_Rebalance(self))
        await consumer.start()
        try:
            while not self.should_stop:
                generation = self.generation
                batch = await consumer.getmany(timeout_ms=int(settings.worker.batch_within_s * 1000) or 1,
                                               max_records=settings.worker.batch_max)
                if not batch:
                    continue
                async with self.pipeline.dedup_lock:
                    if generation != self.generation:
                        # A rebalance happened during the fetch: these records may be from before or after
                        # it. Fetch them again under the current assignment (a repeat is only a duplicate).
                        assignment = consumer.assignment()
                        for tp, part in batch.items():
                            if tp in assignment:
                                consumer.seek(tp, part[0].offset)
                        continue
                    record_lag(self.pipeline.metrics, consumer, batch)
                    records = [r for part in batch.values() for r in part]
                    await process_then_commit(consumer, batch, self.pipeline.dedup_batch(records), "dedup batch")
        finally:
            await consumer.stop()

    async def assigned(self, partitions: set[int]) -> None:
        """Own exactly these keyed partitions: restore the new ones, forget the others."""
        async with self.pipeline.dedup_lock:
            self.generation += 1
            new = partitions - self.owned
            store = self.pipeline.store
            for key in [k for k, entry in store.items() if _entry_partition(entry) not in partitions - new]:
                del store[key]
            started = time.monotonic()
            restored = await self._restore(new) if new else 0
            self.owned = set(partitions)
            log.info("dedup: own keyed partitions %s; restored %d entries of %s in %.1fs",
                     sorted(partitions), restored, sorted(new), time.monotonic() - started)

    async def _restore(self, partitions: set[int]) -> int:
        """Read the changelog partitions from the beginning to their current end into the store."""
        topic = self.pipeline.changelog_topic
        consumer = make_consumer(self.settings)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > 0}
            store = self.pipeline.store
            count = 0
            while remaining:
                for tp, part in (await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)).items():
                    for record in part:
                        if record.offset >= ends[tp]:
                            break
                        if record.value is None:
                            store.pop(record.key, None)
                        else:
                            store[record.key] = orjson.loads(record.value)
                        count += 1
                    if part and part[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            return count
        finally:
            await consumer.stop()


def _entry_partition(entry: Any) -> int | None:
    return int(entry[2]) if isinstance(entry, list) and len(entry) >= 3 else None


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: DedupStage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self.stage.pipeline.dedup_lock:  # wait for the batch in flight (it commits)
            self.stage.generation += 1

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.stage.assigned({tp.partition for tp in assigned})


@click.command("worker")
@click.option("--source", "sources", multiple=True, type=click.Choice(SOURCES),
              help="Only these sources (repeatable; default all). Workers of one group must share the set.")
@click.option("--web-port", type=int, help="Port of /metrics (default worker.web_port; 0 = off).")
@click.pass_obj
def worker_command(ctx: Any, sources: tuple[str, ...], web_port: int | None) -> None:
    """Run the pipeline workers (normalize + dedup) until Ctrl-C."""
    settings = ctx.settings(**{"worker.web_port": web_port})
    Pipeline(settings, sources or SOURCES).run()

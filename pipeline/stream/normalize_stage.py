"""The normalize stage's loop: raw.<source> batches through `normalize_batch`, committed once acknowledged."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.adapting import AdapterModule
from pipeline.config import Settings
from pipeline.stream.consuming import (
    StageProgress,
    guard,
    process_then_commit,
    record_lag,
    stage_consumer,
    stop_consumer,
    stopped_quietly,
)
from pipeline.stream.metrics import WorkerMetrics
from pipeline.stream.normalize_batch import NormalizeTargets, Send, normalize_batch, refuse_record


class NormalizeStage(mode.Service):
    """Stage 1 for every source: one plain aiokafka consumer over the raw topics, batch by batch.

    Poll a batch, normalize each source's records with its adapter, wait for every output's ack, then
    commit exactly those offsets (docs/decisions/0001-explicit-stage-loops.md). A crash before the commit
    replays the batch (at-least-once); dedup and deterministic dead-letter ids absorb the copies. A record
    whose outputs Kafka keeps refusing is isolated and dead-lettered (pipeline.stream.consuming).

    One consumer, not one per source: a worker joins the normalize group as one member, in one rebalance
    (members joining one after another cost a rebalance each, seconds apiece at start-up). Each source
    keeps its own progress (lag, last commit, failing streak), as /health and /metrics report them.
    """

    def __init__(
        self,
        settings: Settings,
        adapters: Sequence[AdapterModule],
        send: Send,
        metrics: WorkerMetrics,
        progress: Mapping[str, StageProgress],
        on_death: Callable[[BaseException], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.send = send
        self.metrics = metrics
        self.on_death = on_death
        self.targets = NormalizeTargets.from_settings(settings)
        self.sources = {
            settings.topics.raw(adapter.SOURCE): _Source(adapter, progress[adapter.SOURCE])
            for adapter in adapters
        }
        for source in self.sources.values():
            metrics.watch(source.progress.name, source.progress.seconds_since_commit)

    async def on_start(self) -> None:
        self.consumer = stage_consumer(self.settings, "normalize", "normalize", *self.sources)
        await self.consumer.start()
        self.add_future(guard("normalize", self._consume(self.consumer), self.on_death))

    async def on_stop(self) -> None:
        await stop_consumer(self.consumer)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        settings = self.settings
        with stopped_quietly(self):
            while not self.should_stop:
                batch = await consumer.getmany(
                    timeout_ms=int(settings.worker.batch_within_s * 1000) or 1,
                    max_records=settings.worker.batch_max,
                )
                by_topic: dict[str, dict[TopicPartition, list[Any]]] = {topic: {} for topic in self.sources}
                for tp, records in batch.items():
                    by_topic[tp.topic][tp] = records
                for topic, part in by_topic.items():
                    record_lag(self.metrics, consumer, part, self.sources[topic].progress)
                await asyncio.gather(
                    *(
                        self.sources[topic].process(consumer, part, self)
                        for topic, part in by_topic.items()
                        if part
                    )
                )


class _Source:
    """One source's adapter and progress inside the normalize stage."""

    def __init__(self, adapter: AdapterModule, progress: StageProgress) -> None:
        self.adapter = adapter
        self.progress = progress

    async def process(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]], stage: NormalizeStage
    ) -> None:
        async def normalize(records: Sequence[Any]) -> None:
            await normalize_batch(records, self.adapter, stage.send, stage.targets, stage.metrics)

        async def quarantine(record: Any, exc: BaseException) -> None:
            await refuse_record(record, self.adapter, stage.send, stage.targets, exc)

        await process_then_commit(
            consumer,
            batch,
            normalize,
            self.progress,
            stage.metrics,
            stage.settings.worker.isolate_after_failures,
            quarantine,
        )

"""The normalize stage's loop: raw.<source> batches through `normalize_batch`, committed once acknowledged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer

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
    """Stage 1 for one source: a plain aiokafka consumer in the worker process, batch by batch.

    Poll a batch, normalize it, wait for every output's ack, then commit exactly those offsets
    (docs/decisions/0001-explicit-stage-loops.md). A crash before the commit replays the batch
    (at-least-once); dedup and deterministic dead-letter ids absorb the copies. A record whose outputs
    Kafka keeps refusing is isolated and dead-lettered (pipeline.stream.consuming).
    """

    def __init__(
        self,
        settings: Settings,
        adapter: AdapterModule,
        send: Send,
        metrics: WorkerMetrics,
        progress: StageProgress,
        on_death: Callable[[BaseException], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.adapter = adapter
        self.send = send
        self.metrics = metrics
        self.progress = progress
        self.on_death = on_death
        self.targets = NormalizeTargets.from_settings(settings)
        metrics.watch(progress.name, progress.seconds_since_commit)

    async def on_start(self) -> None:
        source = self.adapter.SOURCE
        self.consumer = stage_consumer(self.settings, "normalize", source, self.settings.topics.raw(source))
        await self.consumer.start()
        self.add_future(guard(self.progress.name, self._consume(self.consumer), self.on_death))

    async def on_stop(self) -> None:
        await stop_consumer(self.consumer)

    async def _process(self, records: Sequence[Any]) -> None:
        await normalize_batch(records, self.adapter, self.send, self.targets, self.metrics)

    async def _quarantine(self, record: Any, exc: BaseException) -> None:
        await refuse_record(record, self.adapter, self.send, self.targets, exc)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        settings = self.settings
        with stopped_quietly(self):
            while not self.should_stop:
                batch = await consumer.getmany(
                    timeout_ms=int(settings.worker.batch_within_s * 1000) or 1,
                    max_records=settings.worker.batch_max,
                )
                record_lag(self.metrics, consumer, batch, self.progress)
                if batch:
                    await process_then_commit(
                        consumer,
                        batch,
                        self._process,
                        self.progress,
                        self.metrics,
                        settings.worker.isolate_after_failures,
                        self._quarantine,
                    )

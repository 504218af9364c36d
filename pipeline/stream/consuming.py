"""The consume -> process -> ack -> commit step that both stream stages share, and what keeps it honest.

Containment: a batch whose outputs fail is retried; after `worker.isolate_after_failures`
failures in a row it is processed record by record, and a record whose outputs still fail is handed to
the stage's `quarantine` (its dead letter) so the records behind it flow on. If the quarantine fails too,
Kafka itself is failing: the batch is retried, the stage's seconds-since-commit grows and /health turns
red. A stage loop that dies ends the worker process (`guard`), so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mode
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, KafkaError

from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer

log = logging.getLogger(__name__)

Process = Callable[[Sequence[Any]], Awaitable[Any]]


class StageMetrics(Protocol):
    """The counters a stage loop keeps (the worker's and the reward dispatcher's metrics both have them)."""

    @property
    def batches_retried(self) -> Any: ...
    @property
    def records_isolated(self) -> Any: ...
    @property
    def consumer_lag(self) -> Any: ...


Quarantine = Callable[[Any, BaseException], Awaitable[None]]


@dataclass
class StageProgress:
    """What /metrics and /health know of one stage loop: its lag, its last commit, its failing streak."""

    name: str
    last_commit: float = field(default_factory=time.monotonic)
    lags: dict[TopicPartition, int] = field(default_factory=dict)
    caught_up: float = field(default_factory=time.monotonic)  # when it last had nothing to do
    failures: int = 0  # failed attempts of the current batch in a row
    topic: str = ""  # the input topic this progress covers (a consumer may read several)
    owned: frozenset[int] = frozenset()  # partitions of `topic` this stage owns now
    partitions: int = 0  # partitions `topic` has (metadata): with `owned`, whether the group covers it all
    restoring: bool = False  # loading state on assignment: busy, not stalled (liveness stays green)

    @property
    def lag(self) -> int:
        return sum(self.lags.values())

    def seconds_since_commit(self) -> float:
        return time.monotonic() - self.last_commit

    def stalled(self, limit_s: float) -> bool:
        """Lag and no commit for longer than limit_s: the stage is not keeping up or not moving at all."""
        if self.restoring:
            return False
        busy_for = time.monotonic() - max(self.last_commit, self.caught_up)
        return self.lag > 0 and busy_for > limit_s

    def restored(self) -> None:
        """A restore has ended: the stall clock starts from now, not from before it."""
        self.restoring = False
        self.caught_up = time.monotonic()


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Leave the group and close the consumer; a stage calls it from on_stop, before its loop is cancelled,
    so the consumer is closed cleanly and a rebalance cannot reach state that is being shut down."""
    await consumer.stop()


@contextlib.contextmanager
def stopped_quietly(service: mode.Service) -> Iterator[None]:
    """A stage loop ends without an error when its consumer was stopped because the service is stopping."""
    try:
        yield
    except ConsumerStoppedError:
        if not service.should_stop:
            raise


def stage_consumer(
    settings: Settings, stage: str, name: str, *topics: str, sticky: bool = False
) -> AIOKafkaConsumer:
    """The consumer of one worker stage: group <app_id>-<stage>, manual commits, the worker's timeouts,
    static membership when the worker has an instance id. With `sticky`, the sticky assignor first (a
    partition stays where its state is); aiokafka's default, round robin, second, so a group still
    holding members of an earlier release agrees on round robin until they are gone."""
    options: dict[str, Any] = {}
    if sticky:
        options["partition_assignment_strategy"] = (StickyPartitionAssignor, RoundRobinPartitionAssignor)
    instance_id = group_instance_id(settings)
    if instance_id:
        options["group_instance_id"] = instance_id
    return make_consumer(
        settings,
        *topics,
        group_id=f"{settings.worker.app_id}-{stage}",
        client_id=f"{settings.kafka.client_id}-{name}",
        max_poll_records=settings.worker.max_poll_records,
        session_timeout_ms=int(settings.worker.session_timeout_s * 1000),
        request_timeout_ms=int(settings.worker.request_timeout_s * 1000),
        heartbeat_interval_ms=int(max(1.0, settings.worker.session_timeout_s / 4) * 1000),
        **options,
    )


def group_instance_id(settings: Settings, environ: Mapping[str, str] = os.environ) -> str | None:
    """worker.instance_id, else the pod's name under Kubernetes (HOSTNAME there is the pod name, stable
    in a StatefulSet), else None: a HOSTNAME elsewhere is shared by every worker of the machine, and two
    members with one instance id fence each other."""
    if settings.worker.instance_id:
        return settings.worker.instance_id
    if environ.get("KUBERNETES_SERVICE_HOST") and environ.get("HOSTNAME"):
        return environ["HOSTNAME"]
    return None


async def process_then_commit(
    consumer: AIOKafkaConsumer,
    batch: dict[TopicPartition, list[Any]],
    process: Process,
    progress: StageProgress,
    metrics: StageMetrics,
    isolate_after: int,
    quarantine: Quarantine | None = None,
    commits_itself: bool = False,
) -> None:
    """Process the batch (its outputs acknowledged), then commit exactly its offsets.

    If the outputs were not acknowledged, seek back so the batch is processed again, never skipped; from
    the `isolate_after`-th failure on, process it record by record and quarantine the records that fail.
    A failed commit means the partitions moved to another member, which replays the batch. With
    `commits_itself` the processing commits the offsets (in its transactions) and this step does not.
    """
    records = [r for part in batch.values() for r in part]
    try:
        await process(records)
    except Exception as exc:  # noqa: BLE001 - any failure of the outputs: retry, then isolate
        progress.failures += 1
        metrics.batches_retried.labels(progress.name).inc()
        if quarantine is None or progress.failures < isolate_after:
            log.warning("outputs of a %s batch were not acknowledged (%r); replaying it", progress.name, exc)
            await _replay_later(consumer, batch, progress.failures)
            return
        try:
            await _one_by_one(records, process, quarantine, progress, metrics)
        except Exception:  # noqa: BLE001 - the dead letter failed too: Kafka is failing, not the record
            log.exception("%s: isolating a failing record failed as well; replaying the batch", progress.name)
            await _replay_later(consumer, batch, progress.failures)
            return
    progress.failures = 0
    if not commits_itself:
        try:
            await consumer.commit({tp: part[-1].offset + 1 for tp, part in batch.items()})
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit of a %s batch failed (%s); the batch will be replayed", progress.name, exc)
            return
    progress.last_commit = time.monotonic()
    assignment = consumer.assignment()  # a rebalance during the batch may have revoked some partitions
    for tp, part in batch.items():
        if tp not in assignment:
            progress.lags.pop(tp, None)
            continue
        highwater = consumer.highwater(tp)
        if highwater is not None:
            progress.lags[tp] = max(0, highwater - part[-1].offset - 1)


async def _one_by_one(
    records: Sequence[Any],
    process: Process,
    quarantine: Quarantine,
    progress: StageProgress,
    metrics: StageMetrics,
) -> None:
    """Each record alone; one whose outputs fail again is quarantined (raises if that fails too)."""
    for record in records:
        try:
            await process([record])
        except Exception as exc:  # noqa: BLE001
            log.error(
                "%s: %s:%s:%s fails alone (%r); dead-lettering it",
                progress.name,
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            await quarantine(record, exc)
            metrics.records_isolated.labels(progress.name).inc()


async def _replay_later(
    consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]], failures: int
) -> None:
    """Seek the still-assigned partitions back to the batch's start and back off (1 s, 2 s, ... 10 s)."""
    assignment = consumer.assignment()
    for tp, part in batch.items():
        if tp in assignment:  # a revoked partition is replayed by its new owner from the committed offset
            consumer.seek(tp, part[0].offset)
    await asyncio.sleep(min(10.0, float(failures)))


def record_lag(
    metrics: StageMetrics,
    consumer: AIOKafkaConsumer,
    batch: dict[TopicPartition, list[Any]],
    progress: StageProgress,
) -> None:
    """headwater_worker_consumer_lag: high watermark - position after this batch, per partition; the
    stage's own lag counts the batch too until it is committed (what /health looks at)."""
    assignment = consumer.assignment()
    for tp in [tp for tp in progress.lags if tp not in assignment]:
        del progress.lags[tp]
    if progress.topic:
        progress.owned = frozenset(tp.partition for tp in assignment if tp.topic == progress.topic)
        progress.partitions = len(consumer.partitions_for_topic(progress.topic) or ())
    if not batch and progress.lag == 0:
        progress.caught_up = time.monotonic()
    for tp, part in batch.items():
        if tp not in assignment:  # aiokafka asserts on the highwater of a partition it no longer has
            continue
        highwater = consumer.highwater(tp)
        if highwater is not None and part:
            progress.lags[tp] = max(0, highwater - part[0].offset)  # not committed until the batch is
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - part[-1].offset - 1)
            )


async def guard(name: str, loop: Awaitable[None], on_death: Callable[[BaseException], None]) -> None:
    """Run a stage loop; if it raises, log it and call on_death (the worker exits non-zero)."""
    try:
        await loop
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a dead loop must never go unnoticed
        log.critical("stage %s died; stopping the worker so that it is restarted", name, exc_info=exc)
        on_death(exc)

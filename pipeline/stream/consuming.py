"""The consume -> process -> ack -> commit step that both stream stages share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, KafkaError

from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer
from pipeline.stream.metrics import WorkerMetrics

log = logging.getLogger(__name__)


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


def stage_consumer(settings: Settings, stage: str, name: str, *topics: str) -> AIOKafkaConsumer:
    """The consumer of one worker stage: group <app_id>-<stage>, manual commits, the worker's timeouts."""
    return make_consumer(
        settings,
        *topics,
        group_id=f"{settings.worker.app_id}-{stage}",
        client_id=f"{settings.kafka.client_id}-{name}",
        max_poll_records=settings.worker.max_poll_records,
        session_timeout_ms=int(settings.worker.session_timeout_s * 1000),
        heartbeat_interval_ms=int(max(1.0, settings.worker.session_timeout_s / 4) * 1000),
    )


async def process_then_commit(
    consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]], processing: Awaitable[Any], what: str
) -> None:
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


def record_lag(
    metrics: WorkerMetrics, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[Any]]
) -> None:
    """headwater_worker_consumer_lag: high watermark - position after this batch, per partition."""
    for tp, part in batch.items():
        highwater = consumer.highwater(tp)
        if highwater is not None and part:
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - part[-1].offset - 1)
            )

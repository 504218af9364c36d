"""The intake stage: rewards.outbound -> a DeliveryJob on rewards.deliveries, or a dead letter on rewards.dlq.

An explicit consume -> process -> ack -> commit loop (pipeline.stream.consuming, as the normalize stages):
every record of a batch gets one of the two outputs, each output's own ack is awaited, and only then are
the batch's offsets committed; a batch whose outputs failed is sought back and read again. Intake never
raises for input: a bug becomes an intake_crashed letter. A job written twice (a replayed batch) is
harmless: the delivery stage keeps one state per (tenant, rewardId).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline import reasons
from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer, make_producer
from pipeline.records import utc_now
from pipeline.rewards.metrics import RewardMetrics
from pipeline.rewards.records import (
    DeliveryJob,
    RewardDeadLetter,
    RewardRejected,
    delivery_key,
    intake_dead_letter,
    read_intake,
)
from pipeline.stream.consuming import StageProgress, guard, process_then_commit, record_lag, stopped_quietly

log = logging.getLogger(__name__)
# (topic, key, value, headers) of one output
IntakeOutput = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]


class IntakeStage(mode.Service):
    """Group <app_id>-rewards on rewards.outbound; outputs through a plain producer, acks awaited."""

    def __init__(
        self,
        settings: Settings,
        metrics: RewardMetrics,
        progress: StageProgress,
        on_death: Callable[[BaseException], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.metrics = metrics
        self.progress = progress
        self.on_death = on_death
        self.webhooks = {t.id: t.rewards_webhook is not None for t in settings.tenants}
        metrics.watch(progress.name, progress.seconds_since_commit)

    async def on_start(self) -> None:
        s = self.settings
        self.producer: AIOKafkaProducer = make_producer(s, linger_ms=5)
        await self.producer.start()
        timeout_ms = int(s.rewards.session_timeout.total_seconds() * 1000)
        self.consumer: AIOKafkaConsumer = make_consumer(
            s,
            s.topics.rewards,
            group_id=f"{s.worker.app_id}-rewards",
            client_id=f"{s.kafka.client_id}-rewards-intake",
            session_timeout_ms=timeout_ms,
            heartbeat_interval_ms=max(1000, timeout_ms // 4),
        )
        await self.consumer.start()
        self.add_future(guard(self.progress.name, self._consume(), self.on_death))

    async def on_stop(self) -> None:
        await self.consumer.stop()

    async def on_shutdown(self) -> None:
        await self.producer.stop()

    async def _consume(self) -> None:
        with stopped_quietly(self):
            while not self.should_stop:
                batch = await self.consumer.getmany(timeout_ms=500, max_records=500)
                record_lag(self.metrics, self.consumer, batch, self.progress)
                if batch:
                    await process_then_commit(
                        self.consumer,
                        batch,
                        self.take_batch,
                        self.progress,
                        self.metrics,
                        self.settings.worker.isolate_after_failures,
                    )

    async def take_batch(self, records: Sequence[Any]) -> None:
        """Every record's output written and acknowledged, or an exception (the batch is read again)."""
        outcomes = [self.outcome(record) for record in records]
        try:
            acks = [
                await self.producer.send(topic, value, key=key, headers=headers)
                for (topic, key, value, headers), _ in outcomes
            ]
            await asyncio.gather(*acks)
        except Exception as exc:
            first = records[0]
            log.warning(
                "could not write the outcome of %d records from %s:%d:%d (%r); they are read again",
                len(records),
                first.topic,
                first.partition,
                first.offset,
                exc,
            )
            raise
        for _, letter in outcomes:  # counted once written: a replayed batch does not count twice
            if letter is not None:
                self.metrics.deliveries.labels(letter.tenant or "-", "invalid").inc()
                log.info(
                    "reward %s dead-lettered at intake: %s: %s", letter.origin, letter.reason, letter.message
                )

    def outcome(self, record: Any) -> tuple[IntakeOutput, RewardDeadLetter | None]:
        """One record -> its output (a job or a dead letter) and the letter, if it is one; never raises."""
        origin = f"{record.topic}:{record.partition}:{record.offset}"
        body: bytes = record.value or b""
        raw_headers: list[tuple[str, bytes]] = list(record.headers or ())
        headers = {k: v.decode("utf-8", "replace") for k, v in raw_headers}
        outcome: DeliveryJob | RewardDeadLetter
        try:
            outcome = read_intake(body, headers, self.webhooks, origin, utc_now())
        except Exception as exc:  # a bug in intake: the record still gets an outcome
            log.exception("intake crashed on %s; dead-lettering it", origin)
            self.metrics.errors.labels("intake").inc()
            crashed = RewardRejected(reasons.REWARD_INTAKE_CRASHED, f"{type(exc).__name__}: {exc}")
            tenant = headers.get("hw-tenant") or None
            outcome = intake_dead_letter(body, tenant, None, crashed, origin, 0, utc_now())
        if isinstance(outcome, DeliveryJob):
            key = delivery_key(outcome.tenant, outcome.reward_id)
            return (self.settings.topics.rewards_deliveries, key, outcome.to_record(), []), None
        return (self.settings.topics.rewards_dlq, record.key, outcome.to_json(), raw_headers), outcome

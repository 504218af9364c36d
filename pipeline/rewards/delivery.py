"""The delivery stage: rewards.deliveries -> the state table, and webhook attempts off the stream.

    rewards.deliveries  DeliveryJob (from intake) | AttemptOutcome (from an attempt)   keyed tenant/rewardId
    per partition and batch, one Kafka transaction: changelog entries + rewards.dlq letters + input offsets
    the table (pipeline.rewards.state) is written once that transaction has committed
    the schedule (pipeline.rewards.schedule) starts due attempts; each attempt's outcome is appended to
    the partition that owns the key, and applied when the stage reads it back

An explicit consume -> process -> transactional produce loop like the dedup stage's
(docs/decisions/0001-explicit-stage-loops.md, 0006-rewards-on-stage-loops.md). At-least-once towards the
webhook: an attempt whose outcome is durable is never made again; a partition taken over runs no attempt
until the stage has applied every record that was on it at the takeover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from pipeline import reasons
from pipeline.config import RewardsWebhook, Settings
from pipeline.kafka.clients import make_consumer, make_producer
from pipeline.reasons import Reason
from pipeline.records import utc_now
from pipeline.rewards.breaker import Breaker
from pipeline.rewards.metrics import RewardMetrics, attempt_result
from pipeline.rewards.records import (
    Attempt,
    AttemptOutcome,
    DeliveryJob,
    DeliveryState,
    RewardDeadLetter,
    b64,
    classify,
    delivery_key,
    parse_message,
    retry_delay_s,
)
from pipeline.rewards.schedule import Schedule
from pipeline.rewards.sender import Sender
from pipeline.rewards.state import RewardTable, changelog_topic
from pipeline.stream.consuming import StageProgress, guard, process_then_commit, record_lag, stopped_quietly
from pipeline.stream.transactions import Output, PartitionTransactions

log = logging.getLogger(__name__)
UNRECORDED_RETRY_S = 5.0  # an attempt whose outcome could not be written to Kafka runs again after this
GONE = "endpoint gone"  # the error of an attempt not made because the endpoint answered 410 Gone
Mode = Literal["send", "skip", "no_webhook", "gone"]
Effect = Callable[[], None]


class DeliveryStage(mode.Service):
    """Owns the rewards.deliveries partitions it is assigned: their states, schedule and producers."""

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
        self.cfg = settings.rewards
        self.metrics = metrics
        self.progress = progress
        self.on_death = on_death
        self.hooks: dict[str, RewardsWebhook | None] = {t.id: t.rewards_webhook for t in settings.tenants}
        self.delays_s = tuple(d.total_seconds() for d in self.cfg.retry_delays)
        self.topic = settings.topics.rewards_deliveries
        self.changelog = changelog_topic(settings)
        self.group_id = f"{settings.worker.app_id}-rewards-delivery"
        self.transactions = PartitionTransactions(settings, self.group_id, stage="rewards")
        self.table = RewardTable()
        self.schedule = Schedule()
        self.sender = Sender()
        self.breakers: dict[str, Breaker] = {}
        self.gone: set[str] = set()  # tenants whose endpoint answered 410 Gone: not called again
        self.expiry: dict[int, deque[tuple[float, bytes]]] = defaultdict(deque)
        self.tasks: set[asyncio.Future[None]] = set()
        self.lock = asyncio.Lock()  # one batch or assignment at a time
        self.owned: set[int] = set()
        self.takeover_ends: dict[int, int] = {}  # held partition -> its end offset at the takeover
        self.generation = 0
        metrics.watch(progress.name, progress.seconds_since_commit)

    # --- lifecycle ----------------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.producer: AIOKafkaProducer = make_producer(self.settings, linger_ms=0)
        await self.producer.start()
        timeout_ms = int(self.cfg.session_timeout.total_seconds() * 1000)
        self.consumer: AIOKafkaConsumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            client_id=f"{self.settings.kafka.client_id}-rewards-delivery",
            session_timeout_ms=timeout_ms,
            heartbeat_interval_ms=max(1000, timeout_ms // 4),
        )
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        await self.consumer.start()
        self.add_future(guard(self.progress.name, self._consume(), self.on_death))

    async def on_stop(self) -> None:
        """Leave the group first, so that no rebalance reaches the producers as they close."""
        await self.consumer.stop()
        for task in list(self.tasks):
            task.cancel()

    async def on_shutdown(self) -> None:
        await self.transactions.close()
        await self.producer.stop()
        await self.sender.close()

    # --- the stage loop -----------------------------------------------------------------------------

    async def _consume(self) -> None:
        tick_ms = max(1, int(self.cfg.tick.total_seconds() * 1000))
        with stopped_quietly(self):
            while not self.should_stop:
                generation = self.generation
                batch = await self.consumer.getmany(timeout_ms=tick_ms, max_records=500)
                async with self.lock:
                    if generation != self.generation:  # fetched across a rebalance: fetch it again
                        assignment = self.consumer.assignment()
                        for tp, part in batch.items():
                            if tp in assignment:
                                self.consumer.seek(tp, part[0].offset)
                        continue
                    record_lag(self.metrics, self.consumer, batch, self.progress)
                    if batch:
                        await process_then_commit(
                            self.consumer,
                            batch,
                            self.apply_batch,
                            self.progress,
                            self.metrics,
                            self.settings.worker.isolate_after_failures,
                            commits_itself=True,  # the offsets go in each partition's transaction
                        )
                    await self._release_caught_up()
                self._dispatch(time.time())
                self._report()

    async def _release_caught_up(self) -> None:
        """A held partition whose consumer position reached its takeover end offset has had every record
        that was on it applied: its attempts may run."""
        for partition, end in list(self.takeover_ends.items()):
            tp = TopicPartition(self.topic, partition)
            if tp not in self.consumer.assignment():
                continue
            if self.progress.failures == 0 and await self.consumer.position(tp) >= end:
                del self.takeover_ends[partition]
                self.schedule.applied(partition, end - 1)
                log.info(
                    "rewards.deliveries partition %d caught up (offset %d): its retries run", partition, end
                )

    async def apply_batch(self, records: Sequence[Any]) -> None:
        """Each partition's records in one transaction, concurrently (a failure replays the batch)."""
        by_partition: dict[int, list[Any]] = defaultdict(list)
        for record in records:
            by_partition[record.partition].append(record)
        outcomes = await asyncio.gather(
            *(self._apply_partition(p, part) for p, part in by_partition.items()), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise failures[0]

    async def _apply_partition(self, partition: int, records: list[Any]) -> None:
        batch = _PartitionBatch(self, partition)
        now = time.time()
        for record in records:
            try:
                message = parse_message(record.value or b"")
            except ValueError as exc:  # not ours: nothing writes such records but this dispatcher
                log.error(
                    "rewards.deliveries %d:%d is unreadable (%s); skipped", partition, record.offset, exc
                )
                self.metrics.errors.labels("delivery").inc()
                continue
            if isinstance(message, DeliveryJob):
                batch.job(message, now)
            else:
                batch.outcome(message, now)
        batch.sweep(now)
        outputs: list[Output] = [
            (self.changelog, key, state.to_record() if state is not None else None, partition)
            for key, state in batch.changes.items()
        ]
        outputs += batch.letters
        offsets = {TopicPartition(self.topic, partition): records[-1].offset + 1}
        await self.transactions.commit(partition, outputs, offsets)
        self.table.apply(batch.changes)
        for effect in batch.effects:
            effect()

    # --- attempts: off the stream ---------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        for tenant in self.schedule.move_due(now) | set(self.schedule.ready_tenants()):
            self._pump(tenant, now)

    def _pump(self, tenant: str, now: float) -> None:
        """Start the tenant's ready attempts while it has free slots (its breaker may short-circuit them)."""
        hook = self.hooks.get(tenant)
        breaker = self.breaker(tenant)
        while self.schedule.has_ready(tenant):
            if (
                hook is not None
                and breaker.state == "closed"
                and self.schedule.in_flight[tenant] >= hook.max_concurrency
            ):
                return
            key = self.schedule.next_ready(tenant)
            if key is None:
                return
            state = self.table.get(key)
            if state is None or state.status != "pending" or state.body is None:
                self.schedule.drop(key)
                continue
            mode: Mode = (
                "no_webhook" if hook is None else "gone" if tenant in self.gone else breaker.admit(now)
            )
            self.schedule.running.add(key)
            if mode == "send":
                self.schedule.in_flight[tenant] += 1
            task = asyncio.ensure_future(self._attempt(key, state, hook, mode))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _attempt(
        self, key: bytes, state: DeliveryState, hook: RewardsWebhook | None, mode: Mode
    ) -> None:
        tenant, number = state.tenant, len(state.attempts) + 1
        try:
            attempt, verdict = await self._make_attempt(state, hook, mode, number)
            self.metrics.attempts.labels(tenant, attempt_result(attempt)).inc()
            outcome = AttemptOutcome(
                tenant=tenant, reward_id=state.reward_id, attempt=attempt, verdict=verdict
            )
            sent = await self.producer.send(
                self.topic, outcome.to_record(), key=key, partition=state.partition
            )
            await sent  # the slot frees only once the outcome is durable: a crash after this re-sends nothing
        except Exception:  # Kafka unreachable: run the same attempt again later (same idempotency headers)
            log.exception("could not record attempt %d of reward %s", number, state.reward_id)
            self.schedule.put(key, time.time() + UNRECORDED_RETRY_S, tenant, state.partition)
        finally:
            self.schedule.running.discard(key)
            if mode == "send":
                self.schedule.in_flight[tenant] -= 1
            self._pump(tenant, time.time())

    async def _make_attempt(
        self, state: DeliveryState, hook: RewardsWebhook | None, mode: Mode, number: int
    ) -> tuple[Attempt, Literal["delivered", "retry", "reject"]]:
        tenant = state.tenant
        if mode == "send" and hook is not None:
            attempt = await self.sender.post(tenant, hook, state.reward_id, state.body or b"", number)
            verdict = classify(attempt.status)
            self.breaker(tenant).record(alive=verdict != "retry", now=time.time())
            self.metrics.latency.labels(tenant).observe(attempt.latency_ms / 1000)
            if attempt.status == 410 and tenant not in self.gone:
                self.gone.add(tenant)
                log.warning(
                    "the rewards_webhook of tenant %s answered 410 Gone: it is not called again until the "
                    "dispatcher restarts; its rewards are dead-lettered (endpoint_gone) meanwhile",
                    tenant,
                )
            return attempt, verdict
        if mode == "skip":
            error = f"circuit open: {self.breaker(tenant).consecutive} consecutive failures; not called"
            return Attempt(number=number, at=utc_now(), error=error), "retry"
        if mode == "gone":
            error = f"{GONE}: the endpoint answered 410 Gone; not called again"
            return Attempt(number=number, at=utc_now(), error=error), "reject"
        return Attempt(
            number=number, at=utc_now(), error="no rewards_webhook configured for the tenant"
        ), "reject"

    def breaker(self, tenant: str) -> Breaker:
        breaker = self.breakers.get(tenant)
        if breaker is None:
            breaker = Breaker(tenant, self.cfg.breaker_failures, self.cfg.breaker_open.total_seconds())
            self.breakers[tenant] = breaker
        return breaker

    def _report(self) -> None:
        for tenant, hook in self.hooks.items():
            if hook is not None:
                self.metrics.queue_depth.labels(tenant).set(self.schedule.depth(tenant))
                self.metrics.in_flight.labels(tenant).set(self.schedule.in_flight[tenant])
                self.metrics.breaker_open.labels(tenant).set(self.breaker(tenant).state != "closed")

    # --- assignment -----------------------------------------------------------------------------------

    async def assigned(self, partitions: set[int]) -> None:
        """Own exactly these partitions: fence earlier owners, restore the new ones, hold them until the
        stage has applied every record on them now (outcomes recorded before a crash come first)."""
        async with self.lock:
            self.generation += 1
            started = time.monotonic()
            new = partitions - self.owned
            gone = self.owned - partitions
            self.table.keep_only(partitions - new)
            self.schedule.forget(gone | new)
            for partition in gone | new:
                self.expiry.pop(partition, None)
                self.takeover_ends.pop(partition, None)
            await self.transactions.own(partitions)  # before the restore: aborts a zombie's open transaction
            restored = await self.table.restore(self.settings, new) if new else []
            now, window = time.time(), self.cfg.dedup_window.total_seconds()
            for state in sorted(restored, key=lambda s: s.finished_at.timestamp() if s.finished_at else 0.0):
                key = delivery_key(state.tenant, state.reward_id)
                if state.status == "pending":
                    self.schedule.put(key, state.due_at or now, state.tenant, state.partition)
                elif state.finished_at is not None:
                    self.expiry[state.partition].append((state.finished_at.timestamp() + window, key))
            if new:
                tps = [TopicPartition(self.topic, p) for p in sorted(new)]
                for tp, offset in (await self._faust_positions(tps)).items():
                    self.consumer.seek(tp, offset)
                ends = await self.consumer.end_offsets(tps)
                for tp, end in ends.items():
                    if end > 0:
                        self.takeover_ends[tp.partition] = end
                        self.schedule.hold(tp.partition, end - 1)
            self.owned = set(partitions)
            log.info(
                "rewards: own deliveries partitions %s; restored %d states of %s in %.1fs; held: %s",
                sorted(partitions),
                len(restored),
                sorted(new),
                time.monotonic() - started,
                sorted(self.takeover_ends),
            )

    async def _faust_positions(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where the earlier, Faust-based dispatcher (group <app_id>-rewards) left the partitions this
        stage's group has never committed: what it read before is in its own table, not in ours, and must
        not be sent again. Empty on a fresh install."""
        ours = make_consumer(self.settings, group_id=self.group_id)
        faust_group = make_consumer(self.settings, group_id=f"{self.settings.worker.app_id}-rewards")
        positions: dict[TopicPartition, int] = {}
        await ours.start()
        await faust_group.start()
        try:
            for tp in tps:
                if (
                    await ours.committed(tp) is None
                    and (offset := await faust_group.committed(tp)) is not None
                ):
                    positions[tp] = offset
        finally:
            await ours.stop()
            await faust_group.stop()
        if positions:
            log.warning("rewards.deliveries: starting where the earlier dispatcher left off: %s", positions)
        return positions

    async def revoked(self) -> None:
        async with self.lock:  # wait for the batch in flight (it commits)
            self.generation += 1


class _PartitionBatch:
    """What one partition's records change, before their transaction commits: new states (None: deleted),
    dead letters, and what to do once committed (schedule, metrics, logs)."""

    def __init__(self, stage: DeliveryStage, partition: int) -> None:
        self.stage = stage
        self.partition = partition
        self.changes: dict[bytes, DeliveryState | None] = {}
        self.letters: list[Output] = []
        self.effects: list[Effect] = []

    def get(self, key: bytes) -> DeliveryState | None:
        return self.changes[key] if key in self.changes else self.stage.table.get(key)

    def job(self, job: DeliveryJob, now: float) -> None:
        stage, key = self.stage, delivery_key(job.tenant, job.reward_id)
        current = self.get(key)
        if current is not None:  # at most one successful delivery per (tenant, rewardId)
            self.changes[key] = current.model_copy(update={"duplicates": current.duplicates + 1})
            self.effects.append(lambda: stage.metrics.deliveries.labels(job.tenant, "duplicate").inc())
            self.effects.append(
                lambda: log.info(
                    "reward %s of tenant %s is already %s; not sent again",
                    job.reward_id,
                    job.tenant,
                    current.status,
                )
            )
            return
        self.changes[key] = DeliveryState(
            status="pending",
            tenant=job.tenant,
            reward_id=job.reward_id,
            partition=self.partition,
            origin=job.origin,
            body=job.body,
            due_at=now,
            first_seen_at=utc_now(),
            redelivery_count=job.redelivery_count,
        )
        self.effects.append(lambda: stage.schedule.put(key, now, job.tenant, self.partition))

    def outcome(self, outcome: AttemptOutcome, now: float) -> None:
        stage, key = self.stage, delivery_key(outcome.tenant, outcome.reward_id)
        state = self.get(key)
        number = outcome.attempt.number
        if state is None or state.status != "pending" or number != len(state.attempts) + 1:
            log.info("ignoring a repeated outcome of attempt %d for reward %s", number, outcome.reward_id)
            return
        attempts = (*state.attempts, outcome.attempt)
        cfg = stage.cfg
        if outcome.verdict == "delivered":
            self.changes[key] = state.model_copy(
                update={
                    "status": "delivered",
                    "body": None,
                    "attempts": (),
                    "attempts_made": len(attempts),
                    "due_at": None,
                    "finished_at": utc_now(),
                }
            )
            expires = now + cfg.dedup_window.total_seconds()

            def delivered() -> None:
                stage.schedule.drop(key)
                stage.expiry[self.partition].append((expires, key))
                stage.metrics.deliveries.labels(outcome.tenant, "delivered").inc()

            self.effects.append(delivered)
            return
        if outcome.verdict == "reject":
            error = outcome.attempt.error or "rejected"
            reason = (
                reasons.REWARD_ENDPOINT_GONE
                if outcome.attempt.status == 410 or error.startswith(GONE)
                else reasons.REWARD_REJECTED
                if outcome.attempt.status is not None
                else reasons.REWARD_NO_WEBHOOK  # the tenant lost its rewards_webhook while pending
            )
            self.dead_letter(key, state, attempts, reason, error)
            return
        delay = retry_delay_s(
            len(attempts),
            stage.delays_s,
            cfg.jitter,
            outcome.attempt.retry_after_s,
            cfg.max_retry_after.total_seconds(),
        )
        if delay is None:
            message = f"{len(attempts)} attempts failed; last: {outcome.attempt.error}"
            self.dead_letter(key, state, attempts, reasons.REWARD_ATTEMPTS_EXHAUSTED, message)
            return
        self.changes[key] = state.model_copy(update={"attempts": attempts, "due_at": now + delay})
        self.effects.append(lambda: stage.schedule.put(key, now + delay, outcome.tenant, self.partition))

    def dead_letter(
        self, key: bytes, state: DeliveryState, attempts: tuple[Attempt, ...], reason: Reason, message: str
    ) -> None:
        stage = self.stage
        letter = RewardDeadLetter(
            id=RewardDeadLetter.make_id(state.origin, "delivery"),
            stage="delivery",
            reason=reason.code,
            message=message,
            tenant=state.tenant,
            reward_id=state.reward_id,
            origin=state.origin,
            body_b64=b64(state.body or b""),
            attempts=attempts,
            failed_at=utc_now(),
            redelivery_count=state.redelivery_count,
        )
        self.letters.append((stage.settings.topics.rewards_dlq, key, letter.to_json(), None))
        self.changes[key] = None

        def dead_lettered() -> None:
            stage.schedule.drop(key)
            stage.metrics.deliveries.labels(state.tenant, "dead_lettered").inc()
            log.warning(
                "reward %s of tenant %s dead-lettered (%s): %s",
                state.reward_id,
                state.tenant,
                reason.code,
                message,
            )

        self.effects.append(dead_lettered)

    def sweep(self, now: float) -> None:
        """Delete the partition's delivered markers older than rewards.dedup_window (tombstones); they
        leave the expiry queue only once the transaction has committed."""
        queue = self.stage.expiry[self.partition]
        count = 0
        for expires, key in queue:
            if expires > now:
                break
            count += 1
            state = self.get(key)
            if state is not None and state.status == "delivered":
                self.changes[key] = None
        if count:

            def expired() -> None:
                for _ in range(count):
                    queue.popleft()

            self.effects.append(expired)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: DeliveryStage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.stage.revoked()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.stage.assigned({tp.partition for tp in assigned})

"""The reward webhook dispatcher: one Faust app, two agents and a timer (docs/sources.md §5).

    rewards.outbound   --intake-->  rewards.deliveries  DeliveryJob, keyed tenant/rewardId (else rewards.dlq)
    rewards.deliveries --deliver--> state table         pending (the durable retry queue) | delivered (dedup)
    timer and deliver  --------->   attempt tasks       HTTP off the stream, per-tenant slots and breaker
    attempt task       --------->   rewards.deliveries  AttemptOutcome, to the partition that owns the key
    deliver applies outcomes:       delivered | retry at its due time | rewards.dlq with every attempt

Every table write happens in the deliver agent while it handles a record of the partition that owns the
key, so table changelog, outputs and consumer offsets move together (at-least-once). Each output is
awaited on its own ack before its record is acknowledged (Faust's flush before a commit does not look at
the results). No agent awaits a webhook: a retry is parked as a due time in the table. After
a rebalance a partition's retries wait, without a time cap, until its catch-up marker has been read.
Both agents check that every offset of their partitions reaches them, and read again what Faust lost
(reads.py; docs/decisions/0005).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import faust
from faust.types import Message
from prometheus_client import generate_latest

from pipeline import reasons
from pipeline.config import RewardsWebhook, Settings
from pipeline.kafka.clients import ensure_topics
from pipeline.kafka.faust_security import faust_credentials
from pipeline.reasons import Reason
from pipeline.records import utc_now
from pipeline.rewards.intake import Intake
from pipeline.rewards.metrics import RewardMetrics, attempt_result
from pipeline.rewards.outputs import retried, write_durably
from pipeline.rewards.reads import ContiguousReads, RangeReader
from pipeline.rewards.records import (
    Attempt,
    AttemptOutcome,
    CatchUpMarker,
    DeliveryJob,
    DeliveryState,
    RewardDeadLetter,
    b64,
    classify,
    delivery_key,
    parse_message,
    retry_delay_s,
)
from pipeline.rewards.webhooks import Breaker, Schedule, Sender, hold_until_read

log = logging.getLogger(__name__)
UNRECORDED_RETRY_S = 5.0  # an attempt whose outcome could not be written to Kafka runs again after this
MARKER_UNREAD_S = 10.0  # a held partition whose agent reads nothing for this long gets another marker
SWEEP_EVERY_S = 60.0  # how often a partition's expired delivered-markers are deleted


class Dispatcher:
    """Builds the Faust app from Settings and holds the in-memory side: schedule, breakers, HTTP sessions."""

    def __init__(self, settings: Settings, exit_after_s: float | None = None) -> None:
        self.settings = settings
        self.cfg = settings.rewards
        self.hooks: dict[str, RewardsWebhook | None] = {t.id: t.rewards_webhook for t in settings.tenants}
        self.webhooks = {tenant: hook is not None for tenant, hook in self.hooks.items()}
        self.generation = 0  # counts rebalances: a catch-up marker task of an older one stops
        self.recovered_at = 0.0  # monotonic time of the last schedule rebuild
        self.caught_up = 0  # the generation whose partitions were all released (logged once)
        self.delays_s = tuple(d.total_seconds() for d in self.cfg.retry_delays)
        self.metrics = RewardMetrics()
        self.schedule = Schedule()
        self.sender = Sender()
        self.breakers: dict[str, Breaker] = {}
        self.expiry: dict[int, deque[tuple[float, bytes]]] = defaultdict(deque)
        self.last_sweep: dict[int, float] = {}
        self.tasks: set[asyncio.Future[None]] = set()
        self.reads = ContiguousReads()  # which offsets of rewards.outbound and deliveries the agents read
        self.range_reader = RangeReader(settings)  # reads what Faust lost on its way to an agent
        self.exit_after_s = exit_after_s
        self.app = self._build_app()

    # --- wiring -------------------------------------------------------------------------------------

    def _build_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            f"{s.worker.app_id}-rewards",
            broker=[f"kafka://{host.strip()}" for host in s.kafka.bootstrap_servers.split(",")],
            broker_credentials=faust_credentials(s.kafka),
            store=self.cfg.store,
            datadir=str(s.worker.data_dir / "rewards"),
            key_serializer="raw",
            value_serializer="raw",
            topic_partitions=s.kafka.partitions,
            topic_replication_factor=s.kafka.replication_factor,
            consumer_auto_offset_reset="earliest",
            web_bind=self.cfg.web_host,
            web_host=self.cfg.web_host,
            web_port=self.cfg.web_port,
            processing_guarantee="at_least_once",
            broker_session_timeout=self.cfg.session_timeout.total_seconds(),
            broker_heartbeat_interval=min(3.0, self.cfg.session_timeout.total_seconds() / 3),
        )
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.outbound = app.topic(s.topics.rewards, **raw)
        self.deliveries = app.topic(s.topics.rewards_deliveries, partitions=s.kafka.partitions, **raw)
        self.dlq = app.topic(s.topics.rewards_dlq, **raw)
        self.state = app.Table(
            "rewards_state",
            partitions=s.kafka.partitions,
            key_type=bytes,
            value_type=bytes,
            on_recover=self._on_recover,
        )
        self.intake = Intake(self.deliveries, self.dlq, self.webhooks, self.metrics)
        app.agent(self.outbound, name="headwater.rewards.intake")(self._intake_agent)
        app.agent(self.deliveries, name="headwater.rewards.deliver")(self._deliver_agent)
        app.timer(self.cfg.tick.total_seconds(), name="headwater.rewards.tick")(self._on_tick)
        app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        app.on_before_shutdown.connect(self._on_shutdown)  # type: ignore[arg-type]
        registry = self.metrics.registry

        async def metrics(view: Any, request: Any) -> Any:  # a plain function: Faust makes it View.get
            return view.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

        app.page("/metrics")(metrics)
        if self.exit_after_s:
            app.task(self._exit_later)
        return app

    # --- the agents' reads ---------------------------------------------------------------------------------

    async def _intake_agent(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await self.handle_in_order(event.message, self.intake.handle)

    async def _deliver_agent(self, stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await self.handle_in_order(event.message, self._deliver)

    async def handle_in_order(self, message: Message, handle: Callable[[Message], Awaitable[None]]) -> None:
        """Handle `message`, after the records before it that never reached the agent (reads.py)."""
        topic, partition, offset = message.topic, message.partition, message.offset
        start = self.reads.expected(topic, partition)
        if self.reads.read(topic, partition, offset) == "gap" and start is not None:
            # Kafka unreachable: the partition waits, nothing is skipped.
            missing = await retried(
                lambda: self.range_reader.read(topic, partition, start, offset),
                f"could not read {topic} partition {partition} from {start}",
            )
            for record in missing or []:
                await handle(record)
                self.app.consumer.ack(record)  # Faust's commit then moves past them
            self.reads.filled(topic, partition, offset)
            self.reads.read(topic, partition, offset)
        await handle(message)

    # --- deliver: jobs and outcomes -> state table ------------------------------------------------------

    async def _deliver(self, message: Message) -> None:
        partition, offset = message.partition, message.offset
        try:
            parsed = parse_message(message.value or b"")
            if isinstance(parsed, DeliveryJob):
                self._on_job(parsed, partition)
            elif isinstance(parsed, AttemptOutcome):
                await self._on_outcome(parsed, partition, message)
            self._sweep(partition, time.time())
        except Exception:  # an escaping exception ends the agent and acks the record anyway
            log.exception("deliver failed for %s:%s", partition, offset)
            self.metrics.errors.labels("deliver").inc()
        finally:
            self.schedule.seen(partition, offset)

    def _on_job(self, job: DeliveryJob, partition: int) -> None:
        key = delivery_key(job.tenant, job.reward_id)
        current = self._get(key)
        if current is not None:  # at most one successful delivery per (tenant, rewardId)
            self.state[key] = current.model_copy(update={"duplicates": current.duplicates + 1}).to_json()
            self.metrics.deliveries.labels(job.tenant, "duplicate").inc()
            log.info(
                "reward %s of tenant %s is already %s; not sent again",
                job.reward_id,
                job.tenant,
                current.status,
            )
            return
        now = time.time()
        state = DeliveryState(
            status="pending",
            tenant=job.tenant,
            reward_id=job.reward_id,
            partition=partition,
            origin=job.origin,
            body=job.body,
            due_at=now,
            first_seen_at=utc_now(),
            redelivery_count=job.redelivery_count,
        )
        self.state[key] = state.to_json()
        self.schedule.put(key, now, job.tenant, partition)
        self._dispatch(now)

    async def _on_outcome(self, outcome: AttemptOutcome, partition: int, source: Message) -> None:
        key = delivery_key(outcome.tenant, outcome.reward_id)
        state = self._get(key)
        number = outcome.attempt.number
        if state is None or state.status != "pending" or number != len(state.attempts) + 1:
            log.info("ignoring a repeated outcome of attempt %d for reward %s", number, outcome.reward_id)
            return
        attempts = (*state.attempts, outcome.attempt)
        now = time.time()
        if outcome.verdict == "delivered":
            marker = state.model_copy(
                update={
                    "status": "delivered",
                    "body": None,
                    "attempts": (),
                    "attempts_made": len(attempts),
                    "due_at": None,
                    "finished_at": utc_now(),
                }
            )
            self.state[key] = marker.to_json()
            self.schedule.drop(key)
            self.expiry[partition].append((now + self.cfg.dedup_window.total_seconds(), key))
            self.metrics.deliveries.labels(outcome.tenant, "delivered").inc()
            return
        if outcome.verdict == "reject":
            # no status: the tenant lost its rewards_webhook while the reward was pending
            reason = (
                reasons.REWARD_REJECTED if outcome.attempt.status is not None else reasons.REWARD_NO_WEBHOOK
            )
            await self._dead_letter(source, key, state, attempts, reason, outcome.attempt.error or "rejected")
            return
        delay = retry_delay_s(
            len(attempts),
            self.delays_s,
            self.cfg.jitter,
            outcome.attempt.retry_after_s,
            self.cfg.max_retry_after.total_seconds(),
        )
        if delay is None:
            message = f"{len(attempts)} attempts failed; last: {outcome.attempt.error}"
            await self._dead_letter(source, key, state, attempts, reasons.REWARD_ATTEMPTS_EXHAUSTED, message)
            return
        self.state[key] = state.model_copy(update={"attempts": attempts, "due_at": now + delay}).to_json()
        self.schedule.put(key, now + delay, outcome.tenant, partition)

    async def _dead_letter(
        self,
        source: Message,
        key: bytes,
        state: DeliveryState,
        attempts: tuple[Attempt, ...],
        reason: Reason,
        message: str,
    ) -> None:
        letter = RewardDeadLetter(
            id=RewardDeadLetter.make_id(state.origin, "delivery"),
            stage="delivery",
            reason=reason.code,
            message=message,
            tenant=state.tenant,
            reward_id=state.reward_id,
            origin=state.origin,
            body_b64=b64((state.body or "").encode()),
            attempts=attempts,
            failed_at=utc_now(),
            redelivery_count=state.redelivery_count,
        )
        value, headers = letter.to_json(), [("hw-tenant", state.tenant.encode())]
        await write_durably(source, lambda: self.dlq.send(key=key, value=value, headers=headers))
        del self.state[key]  # only once the letter is durable
        self.schedule.drop(key)
        self.metrics.deliveries.labels(state.tenant, "dead_lettered").inc()
        log.warning(
            "reward %s of tenant %s dead-lettered (%s): %s",
            state.reward_id,
            state.tenant,
            reason.code,
            message,
        )

    def _sweep(self, partition: int, now: float) -> None:
        """Delete delivered markers older than rewards.dedup_window (Faust tables have no TTL)."""
        if now - self.last_sweep.get(partition, 0.0) < SWEEP_EVERY_S:
            return
        self.last_sweep[partition] = now
        queue = self.expiry[partition]
        while queue and queue[0][0] <= now:
            _, key = queue.popleft()
            state = self._get(key)
            if state is not None and state.status == "delivered":
                del self.state[key]

    def _get(self, key: bytes) -> DeliveryState | None:
        raw = self.state.get(key)
        return DeliveryState.from_json(raw) if raw is not None else None

    # --- attempts: off the stream --------------------------------------------------------------------

    def _dispatch(self, now: float) -> None:
        for tenant in self.schedule.move_due(now) | set(self.schedule.ready_tenants()):
            self._pump(tenant, now)

    def _pump(self, tenant: str, now: float) -> None:
        """Start the tenant's ready attempts while it has free slots (its breaker may short-circuit them)."""
        hook = self.hooks.get(tenant)
        breaker = self._breaker(tenant)
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
            state = self._get(key)
            if state is None or state.status != "pending" or state.body is None:
                self.schedule.drop(key)
                continue
            mode: Literal["send", "skip", "no_webhook"] = "no_webhook" if hook is None else breaker.admit(now)
            self.schedule.running.add(key)
            if mode == "send":
                self.schedule.in_flight[tenant] += 1
            task = asyncio.ensure_future(self._attempt(key, state, hook, mode))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _attempt(
        self,
        key: bytes,
        state: DeliveryState,
        hook: RewardsWebhook | None,
        mode: Literal["send", "skip", "no_webhook"],
    ) -> None:
        tenant, number = state.tenant, len(state.attempts) + 1
        try:
            if mode == "send" and hook is not None:
                attempt = await self.sender.post(
                    tenant, hook, state.reward_id, (state.body or "").encode(), number
                )
                verdict = classify(attempt.status)
                self._breaker(tenant).record(alive=verdict != "retry", now=time.time())
                self.metrics.latency.labels(tenant).observe(attempt.latency_ms / 1000)
            elif mode == "skip":
                breaker = self._breaker(tenant)
                attempt = Attempt(
                    number=number,
                    at=utc_now(),
                    error=f"circuit open: {breaker.consecutive} "
                    "consecutive failures; the endpoint was not called",
                )
                verdict = "retry"
            else:
                attempt = Attempt(
                    number=number, at=utc_now(), error="no rewards_webhook configured for the tenant"
                )
                verdict = "reject"
            self.metrics.attempts.labels(tenant, attempt_result(attempt)).inc()
            outcome = AttemptOutcome(
                tenant=tenant, reward_id=state.reward_id, attempt=attempt, verdict=verdict
            )
            ack = await self.deliveries.send(key=key, value=outcome.to_json(), partition=state.partition)
            await ack  # the slot frees only once the outcome is durable: a crash after this re-sends nothing
        except Exception:  # Kafka unreachable: run the same attempt again later (same idempotency headers)
            log.exception("could not record attempt %d of reward %s", number, state.reward_id)
            self.schedule.put(key, time.time() + UNRECORDED_RETRY_S, tenant, state.partition)
        finally:
            self.schedule.running.discard(key)
            if mode == "send":
                self.schedule.in_flight[tenant] -= 1
            self._pump(tenant, time.time())

    def _breaker(self, tenant: str) -> Breaker:
        breaker = self.breakers.get(tenant)
        if breaker is None:
            breaker = Breaker(tenant, self.cfg.breaker_failures, self.cfg.breaker_open.total_seconds())
            self.breakers[tenant] = breaker
        return breaker

    # --- lifecycle --------------------------------------------------------------------------------------

    async def _on_tick(self) -> None:
        try:
            self._dispatch(time.time())
            for tenant, hook in self.hooks.items():
                if hook is not None:
                    self.metrics.queue_depth.labels(tenant).set(self.schedule.depth(tenant))
                    self.metrics.in_flight.labels(tenant).set(self.schedule.in_flight[tenant])
                    self.metrics.breaker_open.labels(tenant).set(self._breaker(tenant).state != "closed")
        except Exception:  # a timer that raises stops ticking
            log.exception("rewards tick failed")

    async def _on_recover(self) -> None:
        """After every rebalance: rebuild the schedule from the table for this worker's active partitions.

        Each partition is held before anything is scheduled, and stays held, with no time cap, until the
        deliver agent has read the catch-up marker written to it now: outcomes recorded before a crash are
        applied before anything could be re-sent, however slow the restart.
        """
        self.generation += 1
        self.recovered_at = time.monotonic()
        topic = self.deliveries.get_topic_name()
        actives = [tp for tp in self.app.assignor.assigned_actives() if tp.topic == topic]
        partitions = {tp.partition for tp in actives}
        self.schedule.clear()
        self.expiry.clear()
        for partition in partitions:
            self.schedule.hold(partition)
        now = time.time()
        window = self.cfg.dedup_window.total_seconds()
        for key, raw in list(self.state.items()):
            state = DeliveryState.from_json(raw)
            if state.partition not in partitions:
                continue
            if state.status == "pending":
                self.schedule.put(key, state.due_at or now, state.tenant, state.partition)
            elif state.finished_at is not None:
                self.expiry[state.partition].append((state.finished_at.timestamp() + window, key))
        for queue in self.expiry.values():
            ordered = sorted(queue)
            queue.clear()
            queue.extend(ordered)
        await self._rewind_uncommitted()
        for partition in sorted(partitions):
            task = asyncio.ensure_future(self._mark_caught_up(partition, self.generation))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        log.info(
            "schedule rebuilt for partitions %s: %d pending, held until their catch-up markers are read",
            sorted(partitions),
            sum(self.schedule.depth(t) for t in self.hooks),
        )

    async def _mark_caught_up(self, partition: int, generation: int) -> None:
        """Hold `partition` until the agent has read a catch-up marker written to it now (hold_until_read)."""

        def current() -> bool:
            return generation == self.generation

        async def marker_offset() -> int:
            ack = await self.deliveries.send(
                value=CatchUpMarker(written_at=utc_now()).to_json(), partition=partition
            )
            return (await ack).offset

        async def write_marker() -> int | None:  # no marker, no release: the partition's retries keep waiting
            failure = f"could not write the catch-up marker to partition {partition}"
            return await retried(marker_offset, failure, keep_trying=current)

        if await hold_until_read(self.schedule, partition, write_marker, current, MARKER_UNREAD_S):
            self._log_caught_up(generation)

    def _log_caught_up(self, generation: int) -> None:
        """One line when the last partition of a rebuild is released: retries run from now on."""
        if generation == self.generation and not self.schedule.held() and self.caught_up != generation:
            self.caught_up = generation
            log.info("catch-up markers read after %.2f s; retries run", time.monotonic() - self.recovered_at)

    async def _rewind_uncommitted(self) -> None:
        """Seek source partitions that have no committed offset yet back to their first record, and tell
        ContiguousReads where each source partition is read from.

        Faust leaves such a partition wherever its fetcher got to before a rebalance, and drops what it
        fetched: a group that never committed (a first worker killed within seconds) would skip records.
        """
        sources = {self.outbound.get_topic_name(), self.deliveries.get_topic_name()}
        committed = await self.app.consumer.seek_to_committed()  # type: ignore[attr-defined]
        fresh = [tp for tp, offset in committed.items() if tp.topic in sources and offset is None]
        earliest = await self.app.consumer.earliest_offsets(*fresh) if fresh else {}
        for tp in fresh:
            await self.app.consumer.seek(tp, earliest.get(tp) or 0)
        self.reads.forget()
        for tp, offset in committed.items():
            if tp.topic in sources:
                start = offset if offset is not None else earliest.get(tp) or 0
                self.reads.start(tp.topic, tp.partition, start)

    async def _on_revoked(self, sender: Any, revoked: Any, **kwargs: Any) -> None:
        self.generation += 1
        self.schedule.clear()
        self.reads.forget()

    async def _on_shutdown(self, sender: Any, **kwargs: Any) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.sender.close()
        await self.range_reader.close()

    async def _exit_later(self) -> None:
        assert self.exit_after_s is not None
        await asyncio.sleep(self.exit_after_s)
        log.info("--exit-after %.0f s reached; stopping", self.exit_after_s)
        os.kill(os.getpid(), signal.SIGTERM)


def run_dispatcher(settings: Settings, exit_after_s: float | None = None, debug: bool = False) -> None:
    """`headwater rewards run`: create the topics, then run the Faust worker until SIGINT/SIGTERM."""
    topics = settings.topics
    asyncio.run(ensure_topics(settings, [topics.rewards, topics.rewards_deliveries, topics.rewards_dlq]))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    (settings.worker.data_dir / "rewards").mkdir(parents=True, exist_ok=True)
    dispatcher = Dispatcher(settings, exit_after_s)
    # The table's changelog too: left to Faust, it can be created after the group's first assignment,
    # whose assignor then skips it ("Ignoring missing topic"), and every table write fails with
    # PartitionsMismatch until the next rebalance (seen in CI: no reward delivered).
    changelog = dispatcher.state.changelog_topic.get_topic_name()
    loop.run_until_complete(ensure_topics(settings, [changelog], config={"cleanup.policy": "compact"}))
    worker = faust.Worker(dispatcher.app, quiet=True, override_logging=False)  # levels: pipeline.logs
    worker.spinner = None  # its cursor codes would land in the logs
    worker.execute_from_commandline()

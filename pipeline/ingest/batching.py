"""Records that arrive together go to Kafka as one record batch; each request still waits for its ack.

One aiokafka `send()` per record costs a future, a partitioner call and accumulator work per record;
here the records that arrive while the topic's previous batch is with the broker share one
`BatchBuilder`, one `send_batch` and one acknowledgement future. One batch per topic
is with the broker at a time: the next one is handed over when the last is acknowledged, so batches grow
with the load instead of each request of a quiet moment becoming its own produce request (measured at a
fixed 1,500 requests/s: half the batches, ~15 % less CPU a request, lower p50 and p99). Batches rotate
over the topic's partitions, as the default partitioner does for records without a key.

The requests of an acknowledged batch are answered a few loop turns after the ack, once aiokafka has
written the next batch to the broker: answering first kept the broker idle while ~20-30 answers were
written, and the receiver idle while the broker then worked (closed loop, 32 connections, alternating
rounds: the receiver 76 -> 84 % busy, ~+10 % requests/s; all within a noisy shared machine's spread).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from pipeline.errors import BrokerUnavailable, PayloadTooLarge
from pipeline.kafka.clients import broker_errors

KafkaHeaders = Sequence[tuple[str, bytes]]
# Loop turns from an ack to aiokafka's write of the next batch (its sender wakes, drains, then starts the
# produce task): answering after them keeps the broker working while we write the answers.
ANSWER_AFTER_TURNS = 4
Observe = Callable[[str, float], None]  # (topic, seconds from first append to ack)


class _Pending:
    """One batch being filled: its builder and the future every request in it awaits, which fails with
    503 if the broker has not acknowledged the batch within the ack timeout."""

    def __init__(self, builder: BatchBuilder, timeout_s: float, retry_after_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.builder = builder
        self.acked: asyncio.Future[None] = loop.create_future()
        self.delivered = False  # acknowledged; its requests are answered a few loop turns later
        self.started = time.perf_counter()
        timer = loop.call_later(timeout_s, self._time_out, retry_after_s)
        self.acked.add_done_callback(lambda _: timer.cancel())

    def _time_out(self, retry_after_s: float) -> None:
        if not self.acked.done() and not self.delivered:
            self.acked.set_exception(BrokerUnavailable("Kafka did not acknowledge in time", retry_after_s))


class BatchWriter:
    """Appends records to a per-topic open batch and sends full or finished batches in the background."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        ack_timeout_s: float,
        retry_after_s: float,
        max_request_bytes: int,
        observe: Observe | None = None,
    ) -> None:
        self.producer = producer
        self.ack_timeout_s = ack_timeout_s
        self.retry_after_s = retry_after_s
        self.max_request_bytes = max_request_bytes
        self._observe = observe or (lambda topic, seconds: None)
        self._open: dict[str, _Pending] = {}
        self._ready: dict[str, deque[_Pending]] = {}
        self._flushing: set[str] = set()
        self._partitions: dict[str, itertools.cycle[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def write(self, topic: str, value: bytes, headers: KafkaHeaders) -> asyncio.Future[None]:
        """Add one record; the returned future resolves on the broker's ack of its batch (or fails)."""
        pending = self._open.get(topic)
        if pending is not None and pending.acked.done():  # timed out waiting its turn: never sent
            del self._open[topic]
            pending = None
        if (
            pending is None
            or pending.builder.append(timestamp=None, key=None, value=value, headers=headers) is None
        ):
            if pending is not None:  # full: queue it, start another
                self._ready.setdefault(topic, deque()).append(pending)
            pending = self._new_batch(topic)
            pending.builder.append(timestamp=None, key=None, value=value, headers=headers)
        return pending.acked

    def write_all(self, topic: str, records: Sequence[tuple[bytes, KafkaHeaders]]) -> asyncio.Future[None]:
        """All records in one batch on one partition: the broker appends all of them or none."""
        builder = BatchBuilder(self.max_request_bytes, 0, is_transactional=False)  # 0: uncompressed
        for value, headers in records:
            if builder.append(timestamp=None, key=None, value=value, headers=headers) is None:
                raise PayloadTooLarge("the records of this request do not fit in one Kafka request")
        if builder.size() > self.max_request_bytes:
            raise PayloadTooLarge("the records of this request do not fit in one Kafka request")
        pending = _Pending(builder, self.ack_timeout_s, self.retry_after_s)
        self._ready.setdefault(topic, deque()).append(pending)
        self._schedule(topic)
        return pending.acked

    def _new_batch(self, topic: str) -> _Pending:
        pending = _Pending(self.producer.create_batch(), self.ack_timeout_s, self.retry_after_s)
        self._open[topic] = pending
        self._schedule(topic)
        return pending

    def _schedule(self, topic: str) -> None:
        if topic not in self._flushing:
            self._flushing.add(topic)
            task = asyncio.get_running_loop().create_task(self._flush(topic))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, topic: str) -> None:
        """Send ready batches, then the open one, each after the last one's ack, until nothing is left;
        requests keep appending to the open batch meanwhile."""
        try:
            await asyncio.sleep(0)  # let this loop turn's requests join the open batch
            while True:
                ready = self._ready.get(topic)
                if ready:
                    pending = ready.popleft()
                elif topic in self._open:
                    pending = self._open.pop(topic)
                else:
                    return
                delivered = await self._send(topic, pending)
                if delivered is not None:  # its outcome is _settle's; here only "answered, or given up on"
                    await asyncio.wait([delivered], timeout=self.ack_timeout_s)
        finally:
            self._flushing.discard(topic)
            if self._ready.get(topic) or topic in self._open:
                self._schedule(topic)

    async def _send(self, topic: str, pending: _Pending) -> asyncio.Future[object] | None:
        """Hand a batch to the producer; its delivery future, or None when it was not handed over."""
        if pending.acked.done():  # timed out before it could be sent: never send it after a 503
            return None
        try:
            async with broker_errors(f"writing to {topic}", self.retry_after_s):
                partition = await self._next_partition(topic)
                delivered: asyncio.Future[object] = await self.producer.send_batch(
                    pending.builder, topic, partition=partition
                )
        except BrokerUnavailable as exc:
            if not pending.acked.done():
                pending.acked.set_exception(exc)
            return None
        delivered.add_done_callback(lambda done: self._settle(topic, pending, done))
        return delivered

    def _settle(self, topic: str, pending: _Pending, delivered: asyncio.Future[object]) -> None:
        if pending.acked.done():
            return
        error = delivered.exception() if not delivered.cancelled() else asyncio.CancelledError()
        if error is None:
            pending.delivered = True
            self._observe(topic, time.perf_counter() - pending.started)
            _answer_after(ANSWER_AFTER_TURNS, pending.acked)
        else:
            pending.acked.set_exception(
                BrokerUnavailable(f"writing to {topic}: {error!r}", self.retry_after_s)
            )

    async def _next_partition(self, topic: str) -> int:
        cycle = self._partitions.get(topic)
        if cycle is None:
            partitions = await asyncio.wait_for(self.producer.partitions_for(topic), self.ack_timeout_s)
            cycle = itertools.cycle(sorted(partitions))
            self._partitions[topic] = cycle
        return next(cycle)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _answer_after(turns: int, acked: asyncio.Future[None]) -> None:
    """Resolve an acknowledged batch's future `turns` loop turns from now (see ANSWER_AFTER_TURNS)."""
    if turns:
        asyncio.get_running_loop().call_soon(_answer_after, turns - 1, acked)
    elif not acked.done():
        acked.set_result(None)

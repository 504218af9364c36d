"""One transactional producer per keyed partition a stage owns: the dedup stage, the reward delivery stage
(docs/pitfalls.md, "aiokafka").

aiokafka has no KIP-447 consumer-group metadata in `send_offsets_to_transaction`, so zombies are fenced the
EOS-v1 way: the transactional id is derived from the app id and the keyed partition, and the producer is
created (init_transactions) when the partition is assigned. That aborts whatever transaction an earlier
owner of the partition left open and fences that owner's producer: its later commit fails. Each batch of a
partition is one transaction: canonical events + changelog entries + the input offsets, all or nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordListTooLargeError,
)

from pipeline.config import Settings
from pipeline.kafka.clients import make_producer
from pipeline.kafka.partitioning import key_partition

log = logging.getLogger(__name__)

# The broker refused one of the records (the transaction's other records were fine).
_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, OutOfOrderSequenceNumber)

# (topic, key, value, partition or None) of one record of a transaction; a None value is a tombstone.
Output = tuple[str, bytes | None, bytes | None, int | None]


class NotOwned(Exception):
    """This worker holds no live transactional producer for the partition (fenced, or not assigned)."""


class PartitionTransactions:
    """The transactional producers of the keyed partitions this worker owns, by partition."""

    def __init__(self, settings: Settings, group_id: str, stage: str = "dedup") -> None:
        self.settings = settings
        self.group_id = group_id
        self.stage = stage
        self.producers: dict[int, AIOKafkaProducer] = {}
        self.owned: set[int] = set()  # assigned and not fenced: a missing producer is re-created
        self.retry_at: dict[int, float] = {}  # partition -> when its re-creation may be tried again
        self.backoff_s: dict[int, float] = {}

    def transactional_id(self, partition: int) -> str:
        return f"{self.settings.worker.app_id}-{self.stage}-{partition}"

    async def own(self, partitions: set[int]) -> set[int]:
        """Close the producers of partitions no longer owned; create (and so fence for) the new ones.
        Returns the partitions whose producer could not be created: `ensure` re-creates them later."""
        self.owned = set(partitions)
        self.retry_at.clear()
        self.backoff_s.clear()
        for partition in [p for p in self.producers if p not in partitions]:
            await _close(self.producers.pop(partition))
        new = sorted(p for p in partitions if p not in self.producers)
        started = await asyncio.gather(*(self._start(p) for p in new), return_exceptions=True)
        failed: set[int] = set()
        for partition, outcome in zip(new, started, strict=True):
            if isinstance(outcome, BaseException):
                log.warning(
                    "keyed partition %d: its transactional producer did not start: %r", partition, outcome
                )
                self._later(partition)
                failed.add(partition)
            else:
                self.producers[partition] = outcome
        return failed

    async def ensure(self, partition: int) -> AIOKafkaProducer:
        """The partition's producer; one lost to a failed abort is re-created, at most once per back-off
        (0.5 s doubling to 30 s), while the partition is owned and not fenced."""
        producer = self.producers.get(partition)
        if producer is not None:
            return producer
        if partition not in self.owned:
            raise NotOwned(f"no transactional producer for keyed partition {partition}")
        wait_s = self.retry_at.get(partition, 0.0) - time.monotonic()
        if wait_s > 0:
            raise NotOwned(f"keyed partition {partition}: its producer is re-created in {wait_s:.1f}s")
        try:
            producer = await self._start(partition)
        except Exception as exc:
            self._later(partition)
            raise NotOwned(
                f"keyed partition {partition}: its producer could not be re-created: {exc!r}"
            ) from exc
        self.retry_at.pop(partition, None)
        self.backoff_s.pop(partition, None)
        self.producers[partition] = producer
        log.info("keyed partition %d: transactional producer re-created", partition)
        return producer

    def _later(self, partition: int) -> None:
        delay = min(30.0, self.backoff_s.get(partition, 0.25) * 2)
        self.backoff_s[partition] = delay
        self.retry_at[partition] = time.monotonic() + delay

    async def _start(self, partition: int) -> AIOKafkaProducer:
        producer = make_producer(
            self.settings,
            transactional_id=self.transactional_id(partition),
            linger_ms=5,
            max_batch_size=512 * 1024,
        )
        await producer.start()  # init_transactions: aborts the earlier owner's open transaction
        return producer

    async def commit(
        self, partition: int, outputs: Sequence[Output], offsets: dict[TopicPartition, int]
    ) -> dict[tuple[str, int], int]:
        """Write the outputs and commit the offsets in one transaction of the partition's producer;
        returns, per topic partition written, the offset just past this transaction's records there.

        On failure the transaction is aborted (or, if that fails, the producer is re-created, which
        aborts it); a fenced producer is dropped, never re-created, since another worker owns the
        partition now and re-creating it would fence that owner in turn.
        """
        producer = await self.ensure(partition)
        try:
            await producer.begin_transaction()
            sent = await send_batched(producer, outputs)
            # Every output's own ack before the commit (a refused record must abort the transaction, not
            # be committed over); the offsets join the transaction meanwhile, which saves a round trip.
            acked, _ = await asyncio.gather(
                asyncio.gather(*(ack for _, _, ack in sent)),
                producer.send_offsets_to_transaction(offsets, self.group_id),
            )
            await producer.commit_transaction()
            ends: dict[tuple[str, int], int] = {}
            for (where, records, _), metadata in zip(sent, acked, strict=True):
                ends[where] = max(ends.get(where, 0), int(metadata.offset) + records)
            return ends
        except ProducerFenced:
            log.warning("keyed partition %d: fenced by a newer owner; dropping its producer", partition)
            self.owned.discard(partition)
            await _close(self.producers.pop(partition))
            raise
        except _REFUSED:
            # The broker refused a record: the producer's sequence numbers for that topic partition are
            # now behind the broker's, and its next send there would fail OutOfOrderSequenceNumber. Abort,
            # then replace the producer (init_transactions starts the sequences afresh).
            await self._abort(partition, producer)
            if self.producers.get(partition) is producer:
                await self._replace(partition, producer)
            raise
        except BaseException:
            await self._abort(partition, producer)
            raise

    async def _abort(self, partition: int, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.abort_transaction(), 15)
        except Exception:  # noqa: BLE001 - a producer that cannot abort is replaced (init aborts for it)
            log.warning(
                "keyed partition %d: abort failed; re-creating its producer", partition, exc_info=True
            )
            await self._replace(partition, producer)

    async def _replace(self, partition: int, producer: AIOKafkaProducer) -> None:
        """Close the producer and create the partition's anew (init_transactions aborts what it left open);
        if that fails too, the next batch re-creates it (`ensure`), with back-off."""
        self.producers.pop(partition, None)
        await _close(producer)
        try:
            self.producers[partition] = await self._start(partition)
        except Exception:  # noqa: BLE001 - the broker is away: ensure() tries again later
            log.warning("keyed partition %d: re-creating its producer failed; retrying later", partition)
            self._later(partition)

    async def close(self) -> None:
        for producer in self.producers.values():
            await _close(producer)
        self.producers.clear()


async def send_batched(
    producer: AIOKafkaProducer, outputs: Sequence[Output]
) -> list[tuple[tuple[str, int], int, Awaitable[Any]]]:
    """Hand the outputs to the producer as closed record batches, one or more per topic partition, in
    order; returns each batch's topic partition, record count and the future of its ack (its metadata
    holds the batch's first offset). A batch is closed so that it goes out without lingering."""
    records: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
    partitions: dict[str, int] = {}
    placed: dict[tuple[str, bytes], int] = {}  # a user's events share a key: hash it once per call
    for topic, key, value, partition in outputs:
        if partition is None:
            count = partitions.get(topic)
            if count is None:
                count = partitions[topic] = len(await producer.partitions_for(topic))
            if key is None:
                partition = random.randrange(count)
            elif (partition := placed.get((topic, key))) is None:
                partition = placed[topic, key] = key_partition(key, count)
        records.setdefault((topic, partition), []).append((key, value))
    acks: list[tuple[tuple[str, int], int, Awaitable[Any]]] = []
    for (topic, partition), pairs in records.items():
        batch = producer.create_batch()
        count = 0
        for key, value in pairs:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start the next
                batch.close()
                ack = await producer.send_batch(batch, topic, partition=partition)
                acks.append(((topic, partition), count, ack))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any one record
                count = 0
            count += 1
        batch.close()
        ack = await producer.send_batch(batch, topic, partition=partition)
        acks.append(((topic, partition), count, ack))
    return acks


async def _close(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 15)
    except Exception:  # noqa: BLE001 - closing is best effort; the next owner's init aborts what is open
        log.warning("a transactional producer did not stop cleanly", exc_info=True)

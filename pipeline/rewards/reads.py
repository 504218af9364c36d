"""Which offsets of each source partition an agent has read, and the records Faust lost on the way to it.

Faust 0.15 can lose a fetched record on its way to an agent while a worker takes over partitions: its
fetcher drops a record whose offset is below the last one it handed on, and a seek races with that
(docs/decisions/0005). Seen here as a delivery outcome that never reached the deliver agent after a
restart, so the reward was sent again, and as a catch-up marker that never arrived, so a partition stayed
held. Offsets of the topics the dispatcher reads are contiguous (no transactions, no compaction), so a
jump is a loss: the agent reads the missing offsets straight from Kafka with a consumer of its own, handles
them in order, then the record that showed the jump. Handling a record twice is harmless (idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from faust.types import TP, Message

from pipeline.config import Settings
from pipeline.kafka.clients import make_consumer

log = logging.getLogger(__name__)

Verdict = Literal["next", "again", "gap"]


class ContiguousReads:
    """Per (topic, partition) the next offset the agent must read; read() classifies each record:

    next   the expected record: handle it;
    again  an offset already read (a re-fetch after a seek or a rebalance): handle it again;
    gap    offsets before it never arrived: read [expected(), offset) first, then call filled().
    """

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def start(self, topic: str, partition: int, offset: int) -> None:
        """The consumer reads `partition` from `offset` on (set at every takeover)."""
        self._next[(topic, partition)] = offset

    def forget(self) -> None:
        """A rebalance: positions are set again when the partitions are taken over."""
        self._next.clear()

    def expected(self, topic: str, partition: int) -> int | None:
        """The offset the agent must read next in `partition` (None: not taken over yet)."""
        return self._next.get((topic, partition))

    def read(self, topic: str, partition: int, offset: int) -> Verdict:
        expected = self._next.get((topic, partition))
        if expected is None or offset == expected:  # None: read before its takeover was recorded
            self._next[(topic, partition)] = offset + 1
            return "next"
        return "again" if offset < expected else "gap"

    def filled(self, topic: str, partition: int, offset: int) -> None:
        """Everything before `offset` has been read (the gap is filled): `offset` is next."""
        self._next[(topic, partition)] = offset


@dataclass
class RangeReader:
    """Reads offsets [start, end) of one partition straight from Kafka: its own consumer, in no group."""

    settings: Settings
    _consumer: AIOKafkaConsumer | None = field(default=None, init=False)

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[Message]:
        """The records there are in [start, end), in order, as Faust messages (an offset may hold none)."""
        if self._consumer is None:
            # Faust's own consumer reads uncommitted records; the agents must see what it would have.
            consumer = make_consumer(self.settings, group_id=None, isolation_level="read_uncommitted")
            await consumer.start()
            self._consumer = consumer
        tp = TopicPartition(topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, start)
        found: list[Message] = []
        while await self._consumer.position(tp) < end:
            batch = await self._consumer.getmany(tp, timeout_ms=1000)
            found += [faust_message(r) for r in batch.get(tp, []) if r.offset < end]
        log.warning(
            "%s partition %d: offsets %d to %d had not reached the agent; read them from Kafka (%d records)",
            topic,
            partition,
            start,
            end - 1,
            len(found),
        )
        return found

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


def faust_message(record: ConsumerRecord[Any, Any]) -> Message:
    """An aiokafka record as the Faust message an agent would have received."""
    return Message(
        record.topic,
        record.partition,
        record.offset,
        record.timestamp / 1000.0,
        record.timestamp_type,
        list(record.headers),
        record.key,
        record.value,
        record.checksum,
        record.serialized_key_size,
        record.serialized_value_size,
        tp=TP(record.topic, record.partition),
    )

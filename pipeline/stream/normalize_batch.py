"""Stage 1, normalize: raw.<source> records -> dead letters on events.dlq and KeyedBatch records on the
keyed topic, partitioned by (tenant, event_id) so that every copy of an id meets one dedup owner.

`normalize_batch` is a plain function over consumed records, an adapter and a send callable: the worker's
`NormalizeStage`, `headwater replay` and the benchmarks all call it, none of them needs a worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import ConsumerRecord

from pipeline import reasons
from pipeline.adapting import AdapterModule
from pipeline.config import Settings
from pipeline.kafka.partitioning import key_partition
from pipeline.reasons import Reason
from pipeline.records import (
    CanonicalEvent,
    DeadLetter,
    KafkaHeaders,
    KeyedBatch,
    Origin,
    RawHeaders,
    RawRecord,
    ReplayTag,
)
from pipeline.stream.dead_letter_budget import DeadLetterBudget
from pipeline.stream.metrics import RECEIPTS_HEADER, SOURCE_HEADER, WorkerMetrics, receipts_header
from pipeline.stream.record_outcomes import dead_letter, outcomes

# Hand one record to a producer: (topic, key, value, partition, headers) -> the future of its ack.
Send = Callable[[str, bytes | None, bytes, int | None, KafkaHeaders | None], Awaitable[Awaitable[Any]]]


@dataclass(frozen=True, slots=True)
class NormalizeTargets:
    """Where the normalize stage writes, and the settings the driver needs."""

    keyed_topic: str
    dlq_topic: str
    keyed_partitions: int
    redrive_limit: int
    max_event_bytes: int = 1_048_576

    @classmethod
    def from_settings(cls, settings: Settings) -> NormalizeTargets:
        return cls(
            settings.topics.keyed,
            settings.topics.dlq,
            settings.kafka.partitions,
            settings.dlq.redrive_limit,
            settings.worker.max_event_bytes,
        )


def raw_record(message: ConsumerRecord[bytes, bytes]) -> RawRecord:
    """A consumed Kafka record as a RawRecord; missing headers raise pydantic.ValidationError."""
    return RawRecord.consumed(message, message.value or b"", RawHeaders.from_kafka(message.headers or ()))


async def normalize_batch(
    messages: Sequence[Any],
    adapter: AdapterModule,
    send: Send,
    targets: NormalizeTargets,
    metrics: WorkerMetrics | None = None,
    replay: ReplayTag | None = None,
) -> tuple[int, int]:
    """Adapter outcomes of every message: dead letters to the DLQ as they are made, events packed per
    keyed partition. An event that cannot be written as JSON, or is over targets.max_event_bytes,
    becomes its item's dead letter here, so no output of one record can fail the batch's sends.

    Returns (keyed records sent, dead letters sent) once every send is acknowledged. A replay tags its
    keyed records so that the dedup stage reports on them.
    """
    acks: list[Awaitable[Any]] = []
    packs: dict[int, KeyedBatch] = defaultdict(KeyedBatch)
    headers = replay.to_headers() if replay else None
    # Receipt runs per keyed partition for the freshness histogram (not for a replay: old receipts)
    receipts: dict[int, list[list[int]]] | None = None if replay else defaultdict(list)
    source_header = (SOURCE_HEADER, adapter.SOURCE.encode())

    def pack_headers(partition: int) -> list[tuple[str, bytes]] | None:
        if receipts is None:
            return headers
        return [source_header, (RECEIPTS_HEADER, receipts_header(receipts.pop(partition, [])))]

    sent_packs = 0
    letters = 0
    keyed_partitions, max_event_bytes = targets.keyed_partitions, targets.max_event_bytes

    async def send_letter(letter: DeadLetter) -> None:
        nonlocal letters
        acks.append(await send(targets.dlq_topic, letter.id.encode(), letter.to_json(), None, None))
        letters += 1
        if metrics:
            metrics.dead_letters.labels(letter.source, letter.reason.partition(":")[0]).inc()

    if metrics:
        metrics.raw_records.labels(adapter.SOURCE).inc(len(messages))
    for message in messages:
        try:
            raw = raw_record(message)
        except Exception as exc:  # noqa: BLE001 - a record without our headers is still kept
            await send_letter(foreign_record(message, adapter.SOURCE, exc))
            continue
        carrier: str | None = None  # this record's dead letter that carries its body
        budget = DeadLetterBudget()
        received_ms = int(raw.headers.received_at.timestamp() * 1000)
        for position, outcome in enumerate(outcomes(raw, adapter, targets.redrive_limit)):
            if isinstance(outcome, CanonicalEvent):
                event_json, failure = _event_json(outcome, max_event_bytes)
                if failure is not None:
                    index = position if adapter.BATCHED else None
                    outcome = dead_letter(
                        raw, "validate", failure[0], failure[1], index=index, body_ref=carrier
                    )
                else:
                    # The keyed partition of the id: Kafka's default partitioner, so every tool agrees.
                    dedup_key = outcome.dedup_key()
                    partition = key_partition(dedup_key.encode(), keyed_partitions)
                    pack = packs[partition]
                    pack.add_json(dedup_key, outcome.kafka_key(), event_json)
                    if receipts is not None:
                        runs = receipts[partition]
                        if runs and runs[-1][0] == received_ms:
                            runs[-1][1] += 1
                        else:
                            runs.append([received_ms, 1])
                    if pack.size >= KeyedBatch.MAX_BYTES:  # keep keyed records well under any size limit
                        del packs[partition]
                        acks.append(
                            await send(
                                targets.keyed_topic, None, pack.to_bytes(), partition, pack_headers(partition)
                            )
                        )
                        sent_packs += 1
                    continue
            if not budget.admit(outcome):
                continue
            if carrier is None and outcome.body_b64 is not None:
                carrier = outcome.id
            await send_letter(outcome)
        summary = budget.summary(raw, carrier)
        if summary is not None:
            await send_letter(summary)
    for partition, pack in packs.items():
        acks.append(
            await send(targets.keyed_topic, None, pack.to_bytes(), partition, pack_headers(partition))
        )
    await asyncio.gather(*acks)
    return sent_packs + len(packs), letters


def _event_json(event: CanonicalEvent, max_bytes: int) -> tuple[bytes, tuple[Reason, str] | None]:
    """The event's JSON, or why it cannot be written (unserializable, or over the size limit)."""
    try:
        event_json = event.to_json()
    except orjson.JSONEncodeError as exc:
        return b"", (reasons.UNSERIALIZABLE_OUTPUT, f"the canonical event cannot be written as JSON: {exc}")
    if len(event_json) > max_bytes:
        return b"", (
            reasons.OUTPUT_TOO_LARGE,
            f"the canonical event is {len(event_json)} bytes, over worker.max_event_bytes = {max_bytes}",
        )
    return event_json, None


def foreign_record(message: Any, source: str, exc: Exception) -> DeadLetter:
    """The dead letter of a raw record without Headwater's headers (not written by our receiver)."""
    headers = RawHeaders(
        tenant="unknown",
        source=source,
        received_at=_utc_from_ms(message.timestamp),
        request_id=f"{message.topic}:{message.partition}:{message.offset}",
    )
    origin = Origin(topic=message.topic, partition=message.partition, offset=message.offset)
    raw = RawRecord(body=message.value or b"", headers=headers, origin=origin)
    return dead_letter(
        raw,
        "parse",
        reasons.INVALID_RAW_HEADERS,
        f"the record lacks Headwater's raw headers ({type(exc).__name__}); was it written by the receiver?",
    )


def _utc_from_ms(timestamp_ms: int | None) -> datetime:
    return datetime.fromtimestamp(timestamp_ms / 1000 if timestamp_ms else time.time(), UTC)


async def refuse_record(
    message: Any, adapter: AdapterModule, send: Send, targets: NormalizeTargets, exc: BaseException
) -> None:
    """Dead-letter a raw record whose outputs Kafka refused even alone (output_refused); waits for the ack."""
    try:
        raw = raw_record(message)
    except Exception as header_error:  # noqa: BLE001
        letter = foreign_record(message, adapter.SOURCE, header_error)
    else:
        letter = dead_letter(
            raw,
            "validate",
            reasons.OUTPUT_REFUSED,
            f"Kafka refused this record's outputs while the records around it went through: "
            f"{type(exc).__name__}: {exc}",
        )
    await (await send(targets.dlq_topic, letter.id.encode(), letter.to_json(), None, None))

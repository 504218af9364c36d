"""Scale-out on a real broker: several worker processes in one group, one SIGKILLed, one added mid-stream.

docs/architecture.md "Scaling out" and "Guarantees": workers scale through the consumer group, and across
crashes and rebalances every raw record ends as canonical events, dead letters or counted duplicates,
with no event_id emitted twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rigs.kafka import WorkerProcess, read_records, wait_for

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.kafka.local import free_port
from pipeline.kafka.reading import end_offsets
from pipeline.records import DeadLetter, RawHeaders, new_request_id, utc_now

SOURCES = ("customerglu", "amplitude")
TENANTS = ("acme", "globex")
PARTITIONS = 12
ORIGINALS = 27_000
DUPLICATES = 3_000  # 10% of the 30,000 raw records repeat an earlier (tenant, event_id)
BAD_EVERY = 50  # every 50th original has no user identity: a dead letter, never canonical


@dataclass(frozen=True)
class Sent:
    """One raw record the test writes: where it goes and what the pipeline must make of it."""

    source: str
    tenant: str
    event_id: str
    good: bool
    body: bytes


def original(i: int) -> Sent:
    source, tenant = SOURCES[i % 2], TENANTS[(i // 2) % 2]
    good = i % BAD_EVERY != 3
    user = {"user_id": f"u{i % 311}"} if good else {}
    if source == "customerglu":
        event_id = f"cg_{i}"
        doc = {"event_id": event_id, "event_name": "tick", "timestamp": 1709294400 + i, **user}
    else:
        event_id = f"amp_{i}"
        doc = {
            "$insert_id": event_id,
            "event_type": "Song Played",
            "event_time": "2024-03-01 12:00:00.000000",
            **user,
        }
    return Sent(source, tenant, event_id, good, orjson.dumps(doc))


def stream(seed: int = 7) -> list[Sent]:
    """27,000 originals in order plus 3,000 repeats, each placed somewhere after its original."""
    rng = random.Random(seed)
    keyed = [(i / ORIGINALS, original(i)) for i in range(ORIGINALS)]
    for j in rng.sample(range(ORIGINALS), DUPLICATES):
        keyed.append((rng.uniform(keyed[j][0], 1.0), keyed[j][1]))
    return [sent for _, sent in sorted(keyed, key=lambda pair: pair[0])]


class PacedProducer(threading.Thread):
    """Writes the records as the receiver would (same headers), in chunks, spread over some seconds."""

    def __init__(
        self, settings: Settings, records: list[Sent], chunk: int = 500, chunk_interval_s: float = 0.3
    ) -> None:
        super().__init__(daemon=True)
        self.settings, self.records = settings, records
        self.chunk, self.chunk_interval_s = chunk, chunk_interval_s
        self.produced = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread
            self.error = exc

    async def _produce(self) -> None:
        producer = make_producer(self.settings, linger_ms=20)
        await producer.start()
        try:
            for start in range(0, len(self.records), self.chunk):
                acks = []
                for sent in self.records[start : start + self.chunk]:
                    headers = RawHeaders(
                        tenant=sent.tenant,
                        source=sent.source,
                        received_at=utc_now(),
                        request_id=new_request_id(),
                        content_type="application/json",
                    )
                    acks.append(
                        await producer.send(
                            self.settings.topics.raw(sent.source), sent.body, headers=headers.to_kafka()
                        )
                    )
                await asyncio.gather(*acks)
                self.produced = min(len(self.records), start + self.chunk)
                await asyncio.sleep(self.chunk_interval_s)
        finally:
            await producer.stop()


def worker_metric(port: int, name: str) -> float:
    """Sum of a counter over its labels, read from a worker's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "_total") and not line.startswith("#")
    )


def total_records(settings: Settings, topic: str) -> int:
    """Records on a topic written without transactions (end offsets; raw topics, the DLQ)."""
    return sum(asyncio.run(end_offsets(settings, topic)).values())


def committed_records(settings: Settings, topic: str) -> int:
    """Records a read_committed reader sees (events.canonical: transaction markers take offsets too)."""
    return len(read_records(settings, topic))


def group_lag(settings: Settings, group: str, topic: str | None = None) -> dict[str, int]:
    """'topic[partition]' -> records not yet committed by the consumer group (only partitions that lag)."""

    async def run() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        lag = {}
        for name in {tp.topic for tp in committed} if topic is None else {topic}:
            for partition, end in (await end_offsets(settings, name)).items():
                meta = committed.get(TopicPartition(name, partition))
                behind = end - (meta.offset if meta is not None and meta.offset >= 0 else 0)
                if behind:
                    lag[f"{name.rsplit('.', 1)[-1]}[{partition}]"] = behind
        return lag

    return asyncio.run(run())


@pytest.mark.slow
def test_three_workers_with_a_crash_and_a_newcomer_emit_every_event_exactly_once(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """30,000 raw records (10% repeats) over 12 partitions; of three workers one is SIGKILLed and a fourth
    joins mid-stream: every id ends on events.canonical exactly once (as a read_committed reader sees it) or
    on events.dlq, every repeat is
    dropped, and the newcomer takes a share of the partitions (docs/architecture.md "Scaling out")."""
    settings = make_settings(
        kafka={"partitions": PARTITIONS}, worker={"batch_max": 500, "session_timeout_s": 6.0}
    )
    topics = settings.topics
    asyncio.run(ensure_topics(settings, [topics.raw(s) for s in SOURCES]))
    records = stream()
    args = [arg for source in SOURCES for arg in ("--source", source)]
    ports = [free_port() for _ in range(4)]

    def start(n: int) -> WorkerProcess:
        return start_worker(settings.with_overrides({"worker.web_port": ports[n]}), *args)

    workers = [start(n) for n in range(3)]
    producer = PacedProducer(settings, records)
    try:
        producer.start()
        # The victim must own partitions and be busy when it dies.
        wait_for(lambda: producer.produced >= 9_000 and _raw_records(ports[0]) > 0, timeout=90, interval=0.2)
        workers[0].kill()
        killed_at = producer.produced
        wait_for(lambda: producer.produced >= 18_000, timeout=60)
        workers.append(start(3))
        joined_at = producer.produced
        producer.join(timeout=90)
        assert producer.error is None and producer.produced == len(records)
        assert killed_at < joined_at < len(records)  # the crash and the join both happened mid-stream

        good = {(s.tenant, s.event_id) for s in records if s.good}
        bad_records = sum(1 for s in records if not s.good)
        try:
            wait_for(
                lambda: (
                    committed_records(settings, topics.canonical) >= len(good)
                    and total_records(settings, topics.dlq) >= bad_records
                ),
                timeout=120,
                interval=1,
            )
        except AssertionError:
            raise AssertionError(
                f"not drained: {committed_records(settings, topics.canonical)} of {len(good)} canonical, "
                f"{total_records(settings, topics.dlq)} of {bad_records} dead letters; "
                f"lag of the dedup group "
                f"on {topics.keyed}: "
                f"{group_lag(settings, settings.worker.app_id + '-dedup', topics.keyed)}; of the "
                f"normalize group: {group_lag(settings, settings.worker.app_id + '-normalize')}"
            ) from None
        # Give a late duplicate emission (after a rebalance) the chance to show up before counting.
        time.sleep(3)
        newcomer_raw = _raw_records(ports[3])
        survivors_duplicates = sum(
            worker_metric(ports[n], "headwater_worker_duplicates_dropped") for n in (1, 2, 3)
        )
    finally:
        for worker in workers:
            worker.stop()

    canonical = Counter(
        (e["tenant"], e["event_id"])
        for e in (orjson.loads(r.value) for r in read_records(settings, topics.canonical))
    )
    letters = {d.id: d for d in (DeadLetter.from_json(r.value) for r in read_records(settings, topics.dlq))}
    lettered = {
        (d.tenant, d.element.get("event_id") or d.element.get("$insert_id"))
        for d in letters.values()
        if isinstance(d.element, dict)
    }
    raw_total = sum(total_records(settings, topics.raw(s)) for s in SOURCES)

    emitted_twice = sorted(key for key, n in canonical.items() if n > 1)
    assert emitted_twice == []
    assert set(canonical) == good
    assert lettered == {(s.tenant, s.event_id) for s in records if not s.good}
    assert {d.reason for d in letters.values()} == {"missing_user_identity"}
    assert len(letters) == bad_records  # one dead letter per bad raw record, repeats included
    assert set(canonical).isdisjoint(lettered)

    # Every raw record is accounted for: canonical, dead-lettered, or a dropped repeat.
    assert raw_total == len(records)
    dropped = raw_total - len(letters) - sum(canonical.values())
    good_repeats = sum(1 for s in records if s.good) - len(good)
    assert dropped == good_repeats > 2_500
    assert survivors_duplicates > 0  # the surviving workers counted repeats they dropped
    assert newcomer_raw > 0  # the fourth worker took over partitions


def _raw_records(port: int) -> float:
    try:
        return worker_metric(port, "headwater_worker_raw_records")
    except OSError:  # not serving yet
        return 0.0

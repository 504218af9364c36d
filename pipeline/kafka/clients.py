"""aiokafka at the boundary: producer/consumer factories, topic creation, and one error mapping.

Reading topics (ranges, partitions, offsets at a time, tails) is pipeline.kafka.reading's, on consumers
built here.

Every aiokafka failure that a caller should answer with "try again later" becomes `BrokerUnavailable`
here, as httpx maps httpcore errors in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import KafkaSettings, Settings
from pipeline.errors import BrokerUnavailable, ConfigError
from pipeline.kafka.security import client_security, verify_access

log = logging.getLogger(__name__)


def producer_options(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """The one set of producer settings: idempotent, acks=all (every in-sync replica has the record), and
    requests big enough for Headwater's largest record. The worker's Faust producer reads the same values."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "client_id": settings.kafka.client_id,
        **client_security(settings.kafka),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.receiver.linger_ms,
        "max_batch_size": 256 * 1024,
        "max_request_size": settings.max_record_bytes,
        "request_timeout_ms": 30_000,
        "compression_type": None,
    }
    options.update(overrides)
    return options


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An AIOKafkaProducer with `producer_options`."""
    return AIOKafkaProducer(**producer_options(settings, **overrides))


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An AIOKafkaConsumer: no auto-commit, committed records only, `[kafka]`'s security."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "client_id": settings.kafka.client_id,
        **client_security(settings.kafka),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        # events.canonical and the dedup changelog are written in transactions: our readers see only
        # committed records (for topics written without transactions this changes nothing).
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def broker_answers(producer: AIOKafkaProducer, timeout_s: float = 3.0) -> bool:
    """Whether the producer's brokers answer a metadata request within `timeout_s` now (readiness probes:
    a started producer says nothing about the broker being there still)."""
    try:
        return bool(await asyncio.wait_for(producer.client.force_metadata_update(), timeout_s))
    except Exception:  # noqa: BLE001 - any failure means "not answering"
        return False


def make_admin(settings: Settings, **overrides: Any) -> AIOKafkaAdminClient:
    """An AIOKafkaAdminClient with `[kafka]`'s security."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "client_id": settings.kafka.client_id,
        "request_timeout_ms": 15_000,
        **client_security(settings.kafka),
    }
    options.update(overrides)
    return AIOKafkaAdminClient(**options)


@contextlib.asynccontextmanager
async def broker_errors(
    what: str, retry_after_s: float = 2.0, access: KafkaSettings | None = None
) -> AsyncIterator[None]:
    """Turn aiokafka's retriable failures and timeouts into BrokerUnavailable.

    With `access`, a failure to connect over a secured protocol is first checked by logging in once:
    aiokafka reports a refused login or an untrusted certificate as "unable to bootstrap", and those are
    KafkaAccessRefused (retrying cannot help), not BrokerUnavailable.
    """
    try:
        yield
    except TimeoutError as exc:
        await _refused_access(access)
        raise BrokerUnavailable(f"{what}: Kafka did not answer in time", retry_after_s) from exc
    except KafkaError as exc:
        await _refused_access(access)
        raise BrokerUnavailable(f"{what}: {type(exc).__name__}: {exc}", retry_after_s) from exc
    except OSError as exc:  # connection refused while bootstrapping
        await _refused_access(access)
        raise BrokerUnavailable(f"{what}: {exc}", retry_after_s) from exc


async def _refused_access(kafka: KafkaSettings | None) -> None:
    """Raise KafkaAccessRefused if the broker refuses `kafka`'s credentials or certificate."""
    if kafka is not None and kafka.security_protocol != "PLAINTEXT":
        await verify_access(kafka)


async def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (partition count from kafka.partitions). Returns those created.

    Every topic allows records up to settings.max_record_bytes (the broker's default is 1 MiB). With
    kafka.create_topics = false the topics are an operator's: a missing one is a ConfigError, not created.
    """
    wanted = sorted(set(names))
    config = {"max.message.bytes": str(settings.max_record_bytes), **(config or {})}
    admin = make_admin(settings)
    async with broker_errors("creating topics", access=settings.kafka):
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing and not settings.kafka.create_topics:
                raise ConfigError(
                    f"kafka.create_topics = false and topics {', '.join(missing)} do not exist: create them "
                    "(docs/production.md lists every topic and its settings)"
                )
            if missing:
                new = [
                    NewTopic(
                        n,
                        partitions or settings.kafka.partitions,
                        settings.kafka.replication_factor,
                        topic_configs=config,
                    )
                    for n in missing
                ]
                try:
                    await admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass
                # An aiokafka create_topics response can hold per-topic errors; wait for metadata instead.
                await _wait_for_topics(admin, missing)
            return missing
        finally:
            await admin.close()


async def require_partition_counts(settings: Settings, expected: dict[str, int]) -> None:
    """Refuse to start (ConfigError) when a topic's real partition count is not the one we route by.

    The keyed topic is written with our own partitioner over kafka.partitions, and its partition p pairs
    with partition p of the dedup changelog: if the topic has another count (created by an operator,
    or grown later), ids would land on partitions whose dedup entries are elsewhere.
    """
    admin = make_admin(settings)
    async with broker_errors("reading partition counts", access=settings.kafka):
        await admin.start()
        try:
            described = await admin.describe_topics(sorted(expected))
        finally:
            await admin.close()
    actual = {t["topic"]: len(t["partitions"]) for t in described if t.get("partitions")}
    for topic, count in sorted(expected.items()):
        if actual.get(topic, count) != count:
            raise ConfigError(
                f"topic {topic} has {actual[topic]} partitions but kafka.partitions = {count}: keyed "
                "routing and the dedup changelog need the same count (docs/production.md, 'Partitions')"
            )


async def _wait_for_topics(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        present = set(await admin.list_topics())
        if all(n in present for n in names):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise BrokerUnavailable(f"topics {sorted(set(names) - present)} did not appear")
        await asyncio.sleep(0.1)

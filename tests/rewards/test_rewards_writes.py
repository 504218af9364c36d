"""An output write that fails is never committed over, on the real broker.

Faust flushes its producer before a commit but does not look at the results. The dispatcher awaits each
output's own ack and stays on the record until it is durable. Here rewards.dlq refuses the dead letter
(its max.message.bytes is too small) until the test raises the limit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from rigs.kafka import wait_for
from rigs.rewards import acme_dispatcher, dead_letters

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_consumer, make_producer


def produce_to_partition_0(settings: Settings, body: bytes) -> int:
    """Write one record for tenant acme to partition 0 of the rewards topic; returns its offset."""

    async def run() -> int:
        await ensure_topics(settings, [settings.topics.rewards])
        producer = make_producer(settings, linger_ms=0)
        await producer.start()
        try:
            sent = await producer.send_and_wait(
                settings.topics.rewards, body, partition=0, headers=[("hw-tenant", b"acme")]
            )
            return int(sent.offset)
        finally:
            await producer.stop()

    return asyncio.run(run())


def committed(settings: Settings, group: str, tp: TopicPartition) -> int:
    async def run() -> int:
        consumer = make_consumer(settings, group_id=group)
        await consumer.start()
        try:
            return int(await consumer.committed(tp) or 0)
        finally:
            await consumer.stop()

    return asyncio.run(run())


def set_max_message_bytes(settings: Settings, topic: str, value: int) -> None:
    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(value)})]
            )
        finally:
            await admin.close()

    asyncio.run(run())


def test_a_dead_letter_the_broker_refuses_is_retried_and_its_record_not_committed_until_it_lands(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """After a committed valid reward: while rewards.dlq refuses the letter of an invalid record, the
    dispatcher retries it and the intake's committed offset stays at that record; once the topic accepts it,
    the letter lands and the
    offset moves past it."""

    def small_dlq(settings: Settings) -> None:
        asyncio.run(
            ensure_topics(settings, [settings.topics.rewards_dlq], config={"max.message.bytes": "1000"})
        )

    with acme_dispatcher(kafka_bootstrap, tmp_path, "t_rewards_writes", prepare=small_dlq) as rig:
        settings, customer, dispatcher = rig.settings, rig.customer, rig.dispatcher
        group, source = f"{settings.worker.app_id}-rewards", TopicPartition(settings.topics.rewards, 0)
        first = produce_to_partition_0(settings, b'{"campaignId": "c", "userId": "u", "rewardId": "r-first"}')
        wait_for(lambda: customer.seen("acme", "r-first"), timeout=120)
        wait_for(lambda: committed(settings, group, source) > first, timeout=60)  # commits do happen
        offset = produce_to_partition_0(settings, b"not json " + b"x" * 2_000)  # its letter is > 1000 bytes
        wait_for(lambda: dispatcher.output().count("could not write the outcome") >= 5, timeout=120)
        assert committed(settings, group, source) <= offset  # 0.2 + 0.4 + 0.8 + 1.6 s of retries, no commit
        assert dead_letters(settings) == []
        set_max_message_bytes(settings, settings.topics.rewards_dlq, 1_048_576)
        [letter] = wait_for(lambda: dead_letters(settings), timeout=60)
        assert letter.reason == "invalid_json" and letter.origin == f"{source.topic}:0:{offset}"
        wait_for(lambda: committed(settings, group, source) > offset, timeout=60)

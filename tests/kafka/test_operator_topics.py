"""kafka.create_topics = false: topics belong to an operator (Strimzi KafkaTopic, Terraform); Headwater
checks that they exist and refuses to start without them instead of creating them its own way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.ingest.receiver import Receiver
from pipeline.kafka.clients import ensure_topics


def test_a_receiver_on_operator_managed_topics_refuses_to_start_until_they_exist(
    make_settings: Callable[..., Settings],
) -> None:
    managed = make_settings(kafka={"create_topics": False})
    with pytest.raises(ConfigError, match="create_topics = false and topics .*canonical"):
        asyncio.run(ensure_topics(managed, [managed.topics.canonical]))
    with pytest.raises(ConfigError, match="do not exist"):
        asyncio.run(Receiver(managed).start())

    creating = make_settings()  # the operator's part, done here by Headwater's own creation
    needed = [managed.topics.raw(s) for s in Receiver(managed).adapters] + [managed.topics.rewards]
    asyncio.run(ensure_topics(creating, needed))

    async def start_and_stop() -> int:
        receiver = Receiver(managed)
        try:
            return await receiver.start()
        finally:
            await receiver.stop()

    assert asyncio.run(start_and_stop()) > 0
    assert asyncio.run(ensure_topics(managed, needed)) == []

"""kafka.create_topics = false: topics belong to an operator (Strimzi KafkaTopic, Terraform); Headwater
checks that they exist and refuses to start without them instead of creating them its own way."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from rigs.kafka import die_with_parent, toml_text

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.ingest.receiver import Receiver
from pipeline.kafka.clients import ensure_topics
from pipeline.kafka.reading import end_offsets
from pipeline.ops.replay import replay


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


def test_a_worker_refuses_to_start_when_the_keyed_topic_has_another_partition_count(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Keyed routing hashes over kafka.partitions: a keyed topic of another size (an operator's, or one
    grown later) would send ids to partitions whose dedup entries live elsewhere, so the worker stops."""
    settings = make_settings(kafka={"partitions": 3})
    asyncio.run(ensure_topics(settings, [settings.topics.keyed], partitions=2))
    config = tmp_path / "headwater.toml"
    config.write_text(toml_text(settings))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), "worker", "--source", "segment"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=die_with_parent,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"error: topic {settings.topics.keyed} has 2 partitions but kafka.partitions = 3" in result.stderr


def test_a_replay_refuses_to_route_to_a_keyed_topic_of_another_size(
    make_settings: Callable[..., Settings],
) -> None:
    """A replay routes candidates over kafka.partitions, as the worker does: on a keyed topic of another
    size it stops before sending anything."""
    settings = make_settings(kafka={"partitions": 3})
    asyncio.run(ensure_topics(settings, [settings.topics.keyed], partitions=2))
    with pytest.raises(ConfigError, match=f"topic {settings.topics.keyed} has 2 partitions"):
        asyncio.run(replay(settings, "segment", {0: (0, 1)}))
    assert asyncio.run(end_offsets(settings, settings.topics.keyed)) == {0: 0, 1: 0}

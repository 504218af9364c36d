"""The delivery stage's state table: a DeliveryState per (tenant, rewardId) of the partitions it owns.

Kept like the dedup table: in memory, parsed once (when restored or written), written through to a
compacted changelog topic in the same Kafka transaction as the stage's outputs and input offsets, and
restored (read_committed) from that changelog when a partition is assigned. Partition p of the changelog
holds the entries of rewards.deliveries partition p; a dead-lettered or expired reward is a tombstone.
"""

from __future__ import annotations

import logging

from pipeline.config import Settings
from pipeline.kafka.reading import TopicReader
from pipeline.rewards.records import DeliveryState

log = logging.getLogger(__name__)


def changelog_topic(settings: Settings) -> str:
    return f"{settings.worker.app_id}-rewards-state"


def changelog_config() -> dict[str, str]:
    """Compacted: the latest state of each reward is what a restore needs; tombstones drop the rest."""
    return {"cleanup.policy": "compact"}


class RewardTable:
    """The owned partitions' states by key; `apply` writes what a committed transaction wrote."""

    def __init__(self) -> None:
        self.states: dict[bytes, DeliveryState] = {}

    def get(self, key: bytes) -> DeliveryState | None:
        return self.states.get(key)

    def apply(self, changes: dict[bytes, DeliveryState | None]) -> None:
        for key, state in changes.items():
            if state is None:
                self.states.pop(key, None)
            else:
                self.states[key] = state

    def keep_only(self, partitions: set[int]) -> None:
        """Forget the states of partitions this worker no longer owns."""
        for key in [k for k, s in self.states.items() if s.partition not in partitions]:
            del self.states[key]

    def __len__(self) -> int:
        return len(self.states)

    async def restore(self, settings: Settings, partitions: set[int]) -> list[DeliveryState]:
        """Read the changelog partitions from the beginning to their current end; returns their states.
        Every end is reached (no give-up on idle fetches): a restore must read every record."""
        topic = changelog_topic(settings)
        restored: dict[bytes, DeliveryState | None] = {}
        async with TopicReader(settings, isolation_level="read_committed") as reader:
            ranges = await reader.bounds(topic, partitions)
            async for records in reader.chunks(topic, ranges, idle_fetches=None):
                for record in records:  # a key lives in one partition: its records come in offset order
                    restored[record.key] = _decode(record.value)
        self.apply(restored)
        return [state for state in restored.values() if state is not None]


def _decode(value: bytes | None) -> DeliveryState | None:
    """A changelog value: a state, or None for a tombstone (or an entry this release cannot read, logged:
    a restore must not stop on one)."""
    if value is None:
        return None
    try:
        return DeliveryState.from_record(value)
    except ValueError:
        log.exception("unreadable reward state in the changelog; skipped")
        return None

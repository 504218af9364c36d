"""Kafka's default partitioner (murmur2 of the key, as the Java client and aiokafka compute it), for the
stages that pick a record's partition themselves: the keyed topic, and events.canonical written in batches.

The hash is the `murmurhash2` package's (a compiled MurmurHash2; Kafka's murmur2 is MurmurHash2 with the
seed below): about 15x faster than the pure-Python loop aiokafka has, for a hash the worker computes
once or twice per event. Same values as aiokafka's (tests/kafka/test_partitioning.py).
"""

from __future__ import annotations

from murmurhash2 import murmurhash2

_SEED = 0x9747B28C  # org.apache.kafka.common.utils.Utils.murmur2


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 of `data` (org.apache.kafka.common.utils.Utils.murmur2), as an unsigned int."""
    hashed: int = murmurhash2(data, _SEED)
    return hashed


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner: the partition of a keyed record on a topic of `partitions` partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions

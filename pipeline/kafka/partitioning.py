"""Kafka's default partitioner (murmur2 of the key, as the Java client and aiokafka compute it), for the
stages that pick a record's partition themselves: the keyed topic, and events.canonical written in batches.

aiokafka's `murmur2` reads the key one byte at a time in Python; this one reads it four bytes at a time,
which makes it several times faster on our keys and gives the same hash (tests/kafka/test_partitioning.py).
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF
_M = 0x5BD1E995
_SEED = 0x9747B28C
_WORDS = [struct.Struct(f"<{n}I") for n in range(64)]  # little-endian 32-bit words, by count


def murmur2(data: bytes) -> int:
    """Kafka's 32-bit murmur2 of `data` (org.apache.kafka.common.utils.Utils.murmur2), as an unsigned int."""
    length = len(data)
    h = _SEED ^ length
    count = length >> 2
    words = _WORDS[count] if count < len(_WORDS) else struct.Struct(f"<{count}I")
    for k in words.unpack_from(data):
        k = (k * _M) & _MASK
        h = ((h * _M) ^ ((k ^ (k >> 24)) * _M)) & _MASK  # masking once: the low 32 bits of an xor
    tail = length & 3
    if tail:
        whole = length - tail
        if tail == 3:
            h ^= data[whole + 2] << 16
        if tail >= 2:
            h ^= data[whole + 1] << 8
        h = ((h ^ data[whole]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def key_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner: the partition of a keyed record on a topic of `partitions` partitions."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions

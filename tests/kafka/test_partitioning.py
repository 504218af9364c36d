"""Our murmur2 partitioner is Kafka's default partitioner, bit for bit (pipeline.kafka.partitioning)."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from pipeline.kafka import partitioning


@given(st.binary(max_size=300))
def test_murmur2_equals_aiokafkas_for_any_bytes(data: bytes) -> None:
    """Every key hashes as aiokafka's (and so the Java client's) murmur2 hashes it."""
    assert partitioning.murmur2(data) == murmur2(data)


@given(st.text(max_size=80), st.integers(min_value=1, max_value=1000))
def test_a_key_gets_the_partition_of_the_default_partitioner(key: str, partitions: int) -> None:
    """The partition of a keyed record is the one aiokafka's DefaultPartitioner picks for it."""
    data = key.encode()
    expected = DefaultPartitioner()(data, list(range(partitions)), list(range(partitions)))
    assert partitioning.key_partition(data, partitions) == expected


def test_the_java_clients_check_values_hold() -> None:
    """Known values of Kafka's Utils.murmur2 (clients/src/test/.../UtilsTest.java#testMurmur2)."""
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, signed in cases.items():
        assert partitioning.murmur2(data) == signed & 0xFFFFFFFF

"""The router's producers place keyed records exactly where Kafka's Java client (and aiokafka) would."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as reference

from router.partitioner import default_partition, murmur2


@pytest.mark.parametrize(
    ("key", "expected"),
    # Partitions the Java client's default partitioner picks among 1,000 (Kafka's own compatibility vectors).
    [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)],
)
def test_keys_go_where_the_java_client_puts_them(key: bytes, expected: int) -> None:
    assert default_partition(key, list(range(1000)), list(range(1000))) == expected


def test_every_key_length_and_byte_value_hashes_as_aiokafka_does() -> None:
    rng = random.Random(7)
    aiokafka = DefaultPartitioner()
    for length in range(0, 130):
        for _ in range(20):
            key = bytes(rng.randrange(256) for _ in range(length))
            partitions = list(range(rng.randrange(1, 60)))
            assert default_partition(key, partitions, partitions) == aiokafka(key, partitions, partitions), key
    high = bytes([0xFF] * 11)  # every tail length with the top bit set, where sign handling would differ
    for cut in range(len(high)):
        assert murmur2(high[:cut]) == reference(high[:cut])


def test_a_repeated_key_keeps_its_partition_when_the_topic_grows() -> None:
    # Remembered per key, not per key and partition count: a topic given more partitions must move keys.
    assert default_partition(b"ops-email", [0, 1, 2], [0, 1, 2]) == DefaultPartitioner()(b"ops-email", [0, 1, 2], [])
    grown = list(range(7))
    assert default_partition(b"ops-email", grown, grown) == DefaultPartitioner()(b"ops-email", grown, grown)


def test_a_record_without_a_key_goes_to_an_available_partition() -> None:
    for _ in range(50):
        assert default_partition(None, [0, 1, 2, 3], [2]) == 2
    assert default_partition(None, [0, 1], []) in (0, 1)

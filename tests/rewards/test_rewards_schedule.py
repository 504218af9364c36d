"""The dispatcher's retry schedule holds a taken-over partition until its catch-up marker is read, with no
time cap (issue 12, item 4): by value, no Kafka."""

from __future__ import annotations

from pipeline.rewards.webhooks import Schedule

DAY_S = 86_400.0


def test_a_held_partition_releases_nothing_however_long_it_waits() -> None:
    """Held before the marker's offset is known, then held up to it: a day later nothing is due yet."""
    schedule = Schedule()
    schedule.hold(0)
    schedule.put(b"acme/r1", 0.0, "acme", 0)
    assert schedule.move_due(DAY_S) == set()
    schedule.hold(0, 42)
    schedule.seen(0, 41)
    assert schedule.move_due(2 * DAY_S) == set() and schedule.held() == {0: 42}


def test_reading_the_marker_releases_the_partition_and_only_it() -> None:
    """Once the agent has read the marker's offset, that partition's due keys run; another stays held."""
    schedule = Schedule()
    for partition in (0, 1):
        schedule.hold(partition, 10)
        schedule.put(f"acme/r{partition}".encode(), 0.0, "acme", partition)
    schedule.seen(0, 10)
    assert schedule.move_due(1.0) == {"acme"} and schedule.next_ready("acme") == b"acme/r0"
    assert schedule.next_ready("acme") is None and schedule.held() == {1: 10}


def test_a_marker_already_read_when_its_offset_arrives_releases_at_once() -> None:
    """The agent may read the marker before its write is acknowledged: the hold then ends immediately."""
    schedule = Schedule()
    schedule.hold(0)
    schedule.seen(0, 7)
    schedule.hold(0, 7)
    assert schedule.held() == {}

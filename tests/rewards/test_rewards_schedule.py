"""The retry schedule holds a taken-over partition, with no time cap, until the delivery stage has applied
every record that was on it at the takeover; by value, no Kafka."""

from __future__ import annotations

from pipeline.rewards.schedule import Schedule

DAY_S = 86_400.0


def test_a_held_partition_releases_nothing_however_long_it_waits() -> None:
    """Held up to offset 42 and applied up to 41: a day later nothing of it is due yet."""
    schedule = Schedule()
    schedule.hold(0, 42)
    schedule.put(b"acme/r1", 0.0, "acme", 0)
    schedule.applied(0, 41)
    assert schedule.move_due(DAY_S) == set() and schedule.held() == {0: 42}


def test_applying_the_takeover_offset_releases_the_partition_and_only_it() -> None:
    """Once the stage has applied the takeover's last offset, that partition's due keys run; another waits."""
    schedule = Schedule()
    for partition in (0, 1):
        schedule.hold(partition, 10)
        schedule.put(f"acme/r{partition}".encode(), 0.0, "acme", partition)
    schedule.applied(0, 10)
    assert schedule.move_due(1.0) == {"acme"} and schedule.next_ready("acme") == b"acme/r0"
    assert schedule.next_ready("acme") is None and schedule.held() == {1: 10}


def test_forgetting_a_partition_drops_its_keys_and_its_hold() -> None:
    """A revoked partition's pending keys leave the index (and the tenant's depth); others stay."""
    schedule = Schedule()
    schedule.hold(0, 5)
    schedule.put(b"acme/a", 0.0, "acme", 0)
    schedule.put(b"acme/b", 0.0, "acme", 1)
    schedule.forget({0})
    assert schedule.held() == {} and schedule.depth("acme") == 1
    assert schedule.move_due(1.0) == {"acme"} and schedule.next_ready("acme") == b"acme/b"


def test_a_key_put_again_runs_at_its_latest_due_time_only() -> None:
    """A retry re-put later supersedes the earlier due time; a running key is not queued twice."""
    schedule = Schedule()
    schedule.put(b"acme/a", 1.0, "acme", 0)
    schedule.put(b"acme/a", 5.0, "acme", 0)
    assert schedule.move_due(2.0) == set()
    assert schedule.move_due(5.0) == {"acme"} and schedule.next_ready("acme") == b"acme/a"
    schedule.running.add(b"acme/a")
    schedule.put(b"acme/a", 6.0, "acme", 0)
    assert schedule.move_due(7.0) == set() and schedule.depth("acme") == 1

"""The dispatcher's retry schedule holds a taken-over partition until its catch-up marker is read, with no
time cap, and writes another marker when one never reaches the agent: by value, no
Kafka."""

from __future__ import annotations

import asyncio

from pipeline.rewards.webhooks import Schedule, hold_until_read

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


def test_a_waiter_on_a_hold_learns_when_the_marker_is_read_or_the_index_is_cleared() -> None:
    """wait_released: False while held past its timeout, True once the marker is read, True on a rebalance."""

    async def scenario() -> list[bool]:
        schedule = Schedule()
        schedule.hold(0, 5)
        schedule.hold(1, 5)
        timed_out = await schedule.wait_released(0, 0.01)
        read = asyncio.get_running_loop().call_soon(schedule.seen, 0, 5)
        released = await schedule.wait_released(0, 5.0)
        read.cancel()
        asyncio.get_running_loop().call_soon(schedule.clear)
        cleared = await schedule.wait_released(1, 5.0)
        return [timed_out, released, cleared]

    assert asyncio.run(scenario()) == [False, True, True]


class Markers:
    """A deliveries partition as hold_until_read sees it: each marker written lands at the next offset."""

    def __init__(self, first_offset: int) -> None:
        self.next_offset = first_offset
        self.written: list[int] = []

    async def write(self) -> int | None:
        self.written.append(self.next_offset)
        self.next_offset += 1
        return self.written[-1]


def test_a_marker_the_agent_never_reads_is_written_again_and_only_a_read_releases() -> None:
    """Faust can skip a fetched record across a rebalance: when the agent reads nothing more of a held
    partition, another marker goes out; the hold ends when the agent reads that one, not on a timer."""
    schedule = Schedule()
    markers = Markers(first_offset=8)

    async def scenario() -> bool:
        holding = asyncio.ensure_future(hold_until_read(schedule, 0, markers.write, lambda: True, 0.05))
        while len(markers.written) < 3:  # the first marker (8) and the next (9) are lost
            await asyncio.sleep(0.01)
        assert schedule.held() == {0: 10}
        schedule.seen(0, 10)
        return await holding

    assert asyncio.run(scenario()) is True
    assert markers.written == [8, 9, 10] and schedule.held() == {}


def test_an_agent_still_reading_towards_the_marker_gets_no_second_marker() -> None:
    """A slow catch-up is not a lost marker: while the agent's read position moves, nothing is rewritten."""
    schedule = Schedule()
    markers = Markers(first_offset=100)

    async def scenario() -> bool:
        holding = asyncio.ensure_future(hold_until_read(schedule, 0, markers.write, lambda: True, 0.5))
        for offset in range(0, 101, 10):  # one read every 30 ms: always within the 500 ms window
            await asyncio.sleep(0.03)
            schedule.seen(0, offset)
        return await holding

    assert asyncio.run(scenario()) is True
    assert markers.written == [100]


def test_a_rebalance_ends_the_hold_task_without_a_release() -> None:
    """When the takeover is over (`current()` false), hold_until_read stops and reports no release."""
    schedule = Schedule()
    markers = Markers(first_offset=3)
    takeover = [True]

    async def scenario() -> bool:
        holding = asyncio.ensure_future(hold_until_read(schedule, 0, markers.write, lambda: takeover[0], 5.0))
        while not markers.written:
            await asyncio.sleep(0.01)
        takeover[0] = False
        schedule.clear()
        return await holding

    assert asyncio.run(scenario()) is False

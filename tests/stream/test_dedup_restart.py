"""The dedup state across restarts and rebalances on the real broker: a worker back on its data dir loads
its checkpoints and reads only the changelog written after them, and a checkpoint it cannot trust (torn by
a SIGKILL, older than the changelog's retention, of a partition that moved away and back) is never a
reason to let a duplicate through."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from rigs.kafka import WorkerProcess, produce_raw, read_records, wait_for

from pipeline.config import Settings
from pipeline.stream.dedup_stage import changelog_topic

pytestmark = pytest.mark.slow

RESTORED = re.compile(
    r"dedup: own keyed partitions \[(?P<owned>[\d, ]*)\]; restored \[(?P<new>[\d, ]*)\]: "
    r"(?P<checkpoint_ids>\d+) ids from checkpoints \(\[(?P<checkpointed>[\d, ]*)\]\), "
    r"(?P<changelog_ids>\d+) ids from (?P<records>\d+) changelog records"
)


@dataclass
class Restore:
    new: list[int]
    checkpointed: list[int]
    checkpoint_ids: int
    changelog_ids: int


def restores(worker: WorkerProcess) -> list[Restore]:
    """The restores a worker logged, in order."""
    found = []
    for match in RESTORED.finditer(worker.output()):
        numbers = [[int(n) for n in match[name].split(",") if n.strip()] for name in ("new", "checkpointed")]
        found.append(
            Restore(numbers[0], numbers[1], int(match["checkpoint_ids"]), int(match["changelog_ids"]))
        )
    return found


def events(first: int, count: int) -> list[bytes]:
    return [
        orjson.dumps({"event_id": f"r_{i}", "event_name": "paid", "user_id": f"u{i % 7}", "timestamp": i})
        for i in range(first, first + count)
    ]


def canonical_ids(settings: Settings) -> list[str]:
    return [orjson.loads(r.value)["event_id"] for r in read_records(settings, settings.topics.canonical)]


def wait_canonical(settings: Settings, count: int, timeout: float = 120) -> None:
    wait_for(lambda: len(canonical_ids(settings)) >= count, timeout=timeout, interval=0.5)


def send_repeats_and_marker(settings: Settings, bodies: list[bytes], marker: str) -> None:
    """Send old events again, then a new marker event, and wait until the marker is out: the repeats
    before it in every partition's order have been decided by then."""
    produce_raw(settings, "customerglu", bodies)
    produce_raw(
        settings,
        "customerglu",
        [orjson.dumps({"event_id": marker, "event_name": "m", "user_id": "u1", "timestamp": 0})],
    )
    wait_for(lambda: marker in canonical_ids(settings), timeout=120, interval=0.5)


def assert_each_once(settings: Settings, expected: int) -> None:
    ids = canonical_ids(settings)
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    assert len(ids) == expected


def checkpointed(worker: WorkerProcess, times: int = 1) -> bool:
    return worker.output().count("dedup: checkpointed keyed partitions") >= times


def test_a_restart_on_the_data_dir_loads_checkpoints_reads_only_the_tail_and_re_emits_nothing(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """A worker SIGKILLed after a checkpoint and 100 more events: started again on its data dir, it loads
    the 300 ids of its checkpoints and reads the 100 of the changelog's tail only; no id comes out twice.
    Then a graceful stop checkpoints everything: the next start reads nothing from the changelog."""
    settings = make_settings(dedup={"checkpoint_every": "1s"})
    produce_raw(settings, "customerglu", events(0, 300))
    first = start_worker(settings)
    wait_canonical(settings, 300)
    wait_for(lambda: checkpointed(first), timeout=30)
    produce_raw(settings, "customerglu", events(300, 100))
    wait_canonical(settings, 400)
    first.kill()
    second = start_worker(settings)
    send_repeats_and_marker(settings, events(0, 400), "marker_1")
    [restore] = restores(second)
    assert sorted(restore.checkpointed) == [0, 1, 2]
    assert restore.checkpoint_ids + restore.changelog_ids == 400
    assert restore.checkpoint_ids >= 300  # the changelog read is the tail after the checkpoints
    second.stop()
    third = start_worker(settings)
    send_repeats_and_marker(settings, events(0, 400), "marker_2")
    [restore] = restores(third)
    assert (restore.checkpointed, restore.checkpoint_ids, restore.changelog_ids) == ([0, 1, 2], 401, 0)
    assert_each_once(settings, 402)


def test_a_sigkill_while_a_checkpoint_is_written_never_lets_a_duplicate_through(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Killed while a checkpoint file is half written: the restart ignores the torn file (the previous
    checkpoint or the whole changelog serves) and every earlier id is still a duplicate. A checkpoint
    cut short on disk is refused as well, its partition restored from the changelog."""
    settings = make_settings(dedup={"checkpoint_every": "0.05s"})
    produce_raw(settings, "customerglu", events(0, 20_000))
    worker = start_worker(settings)
    wait_canonical(settings, 20_000, timeout=180)
    directory = settings.worker.data_dir / settings.worker.app_id / "dedup"
    produce_raw(settings, "customerglu", events(20_000, 20_000))
    wait_for(lambda: any(directory.glob("*.tmp")), timeout=60, interval=0.001)
    worker.kill()
    restarted = start_worker(settings)
    send_repeats_and_marker(settings, events(0, 40_000), "marker_1")
    restarted.stop()
    torn = directory / "partition-1.checkpoint"
    torn.write_bytes(torn.read_bytes()[:1000])
    again = start_worker(settings)
    send_repeats_and_marker(settings, events(0, 40_000), "marker_2")
    [restore] = restores(again)
    assert sorted(restore.checkpointed) == [0, 2]
    assert "ignoring the checkpoint" in again.output()
    assert_each_once(settings, 40_002)


def test_a_checkpoint_older_than_the_changelog_s_retention_is_not_trusted(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Records after a worker's checkpoint were deleted from the changelog (retention): the checkpoint no
    longer says what the table holds, so its partition is restored from what the changelog still has."""
    settings = make_settings()
    produce_raw(settings, "customerglu", events(0, 100))
    first = start_worker(settings)
    wait_canonical(settings, 100)
    first.stop()  # checkpoints everything
    elsewhere = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"data_dir": tmp_path / "elsewhere"})}
    )
    other = start_worker(elsewhere)
    produce_raw(settings, "customerglu", events(100, 100))
    wait_canonical(settings, 200)
    other.stop()
    asyncio.run(delete_changelog_before_its_last_record(settings))
    back = start_worker(settings)
    send_repeats_and_marker(settings, [], "marker")
    [restore] = restores(back)
    assert restore.checkpointed == [] and restore.checkpoint_ids == 0
    assert "outside" in back.output() and "restoring from the whole changelog" in back.output()


async def delete_changelog_before_its_last_record(settings: Settings) -> None:
    """What retention does to old segments: every changelog partition starts at its last record."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

    from pipeline.kafka.reading import end_offsets

    topic = changelog_topic(settings)
    ends = {TopicPartition(topic, p): end for p, end in (await end_offsets(settings, topic)).items()}
    tps = list(ends)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(max(0, ends[tp] - 2)) for tp in tps if ends[tp] > 2})
    finally:
        await admin.close()


def test_a_partition_that_comes_back_to_a_worker_that_held_it_before_is_not_read_from_stale_state(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Worker A holds every partition and checkpoints; B joins, takes partitions and emits new ids; B
    leaves and A takes them back. A's table and checkpoint of those partitions predate B's ids: A must
    read what B wrote, so B's ids (and A's own) are still duplicates."""
    settings = make_settings(dedup={"checkpoint_every": "1s"})
    produce_raw(settings, "customerglu", events(0, 200))
    a = start_worker(settings)
    wait_canonical(settings, 200)
    wait_for(lambda: checkpointed(a), timeout=30)
    elsewhere = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"data_dir": tmp_path / "b"})}
    )
    b = start_worker(elsewhere)
    wait_for(lambda: any(r.new for r in restores(b)), timeout=120)
    moved = {p for r in restores(b) for p in r.new}
    produce_raw(settings, "customerglu", events(200, 200))
    wait_canonical(settings, 400)
    b.stop()
    wait_for(lambda: any(moved <= set(r.new) for r in restores(a)[1:]), timeout=120)
    send_repeats_and_marker(settings, events(0, 400), "marker")
    assert_each_once(settings, 401)

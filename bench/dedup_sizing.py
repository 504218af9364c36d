"""Dedup state sizing: worker RSS and disk per held id, warm restart and cold restore (docs/dedup.md).

    .venv/bin/python bench/dedup_sizing.py [--bootstrap HOST:PORT] [--ids 3000000 30000000] [--live 3000000]

For each N of --ids (a fresh app id each):
1. The changelog is written directly: N random 16-byte fingerprints in the binary record layout the worker
   writes (32,768 a record, first seen now), spread evenly over the keyed partitions.
2. Cold restore: `headwater worker` on an empty data dir. One new marker event is produced right after it
   starts; its timestamp on events.canonical marks "emitting again" (the dedup stage consumes only once its
   partitions are restored). The same start on an empty changelog is the baseline: restore time = T(N) -
   T(empty), ids/s = N / that. RSS per id = (RSS at the marker - the baseline worker's RSS) / N. The
   worker's own log line (ids from checkpoints / from changelog records, seconds) is shown next to it.
3. A graceful stop writes the checkpoints: disk per id = the data dir's size / N.
4. Warm restart: the worker started again on that data dir, timed the same way (start -> marker), with the
   ids it read from the changelog (0 expected: only the tail after its checkpoints).
With --live K: K new ids emitted by the worker itself (bulk records of 1,000 events through the normalize
and dedup stages, so the table grows by splitting as in production): RSS per id once they are out.
Figures go to docs/benchmarks.md and the sizing table in docs/dedup.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
from common import (
    ROOT,
    RecordCounter,
    bench_settings,
    broker,
    die_with_parent,
    produce_all,
    raw_headers,
    stop,
    write_config,
)

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.kafka.reading import TopicReader
from pipeline.stream.dedup import CHANGELOG_MAGIC, CHANGELOG_RECORD_IDS
from pipeline.stream.dedup_stage import changelog_config, changelog_topic

SOURCE = "customerglu"
BULK_SOURCE = "usermaven"
RESTORED = re.compile(
    r"(\d+) ids from checkpoints \(.*?\), (\d+) ids from (\d+) changelog records, in ([\d.]+)s"
)


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), "worker"],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


def stop_gracefully(worker: subprocess.Popen[bytes], timeout_s: float = 600) -> float:
    """SIGTERM and wait for the worker to exit (it checkpoints its tables first); seconds it took."""
    started = time.monotonic()
    worker.terminate()
    try:
        worker.wait(timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    return time.monotonic() - started


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def du(path: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def marker_body(n: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"marker-{n}-{uuid.uuid4()}",
            "event_name": "m",
            "user_id": "u1",
            "timestamp": "2024-03-01T12:00:00Z",
        }
    )


@dataclass
class Start:
    seconds: float  # process start -> marker on events.canonical
    rss: int
    logged: str  # the worker's restore line


async def timed_start(
    settings: Settings, config: Path, log: Path, keep: bool = False
) -> tuple[Start, subprocess.Popen[bytes]]:
    """Start a worker, produce a marker at once, wait for it on events.canonical (read_committed)."""
    canonical = settings.topics.canonical
    await ensure_topics(settings, [canonical, settings.topics.raw(SOURCE)])
    reader = TopicReader(settings, fetch_max_wait_ms=50)
    producer = make_producer(settings)
    await reader.start()
    await producer.start()
    body = marker_body(0)
    wanted = orjson.loads(body)["event_id"]
    try:
        fetches = reader.follow(canonical, await reader.end_offsets(canonical))  # what comes after now
        mark = log.stat().st_size if log.exists() else 0
        started = time.time()
        worker = start_worker(config, log)
        await (await producer.send(settings.topics.raw(SOURCE), body, headers=raw_headers(SOURCE, 0)))
        deadline = time.monotonic() + 1800
        while True:
            if worker.poll() is not None or time.monotonic() > deadline:
                stop(worker)
                raise SystemExit(f"no marker (worker exit {worker.returncode}):\n{log.read_text()[-3000:]}")
            records = await anext(fetches)
            if any(orjson.loads(r.value).get("event_id") == wanted for r in records):
                seconds = max(r.timestamp for r in records) / 1000 - started
                break
        rss = rss_bytes(worker.pid)
        text = log.read_bytes()[mark:].decode(errors="replace")
        found = RESTORED.findall(text)
        logged = (
            "; ".join(
                f"{int(c):,} ids from checkpoints, {int(ch):,} from {int(r):,} changelog records "
                f"in {float(s):.1f}s"
                for c, ch, r, s in found
            )
            or "(no restore line)"
        )
        if not keep:
            stop_gracefully(worker)
        return Start(seconds, rss, logged), worker
    finally:
        await producer.stop()
        await reader.stop()


async def write_changelog(settings: Settings, ids: int) -> None:
    """N random fingerprints as the worker's binary changelog records, spread over the keyed partitions."""
    topic = changelog_topic(settings)
    partitions = settings.kafka.partitions
    await ensure_topics(settings, [topic], config=changelog_config(settings))
    producer = make_producer(settings, linger_ms=20, max_batch_size=1024 * 1024, compression_type=None)
    await producer.start()
    try:
        header_time = int(time.time() * 1000).to_bytes(8, "big")
        pending = []
        for n, start in enumerate(range(0, ids, CHANGELOG_RECORD_IDS)):
            count = min(CHANGELOG_RECORD_IDS, ids - start)
            partition = n % partitions
            value = CHANGELOG_MAGIC + header_time + partition.to_bytes(4, "big") + os.urandom(16 * count)
            pending.append(
                await producer.send(topic, value, key=b"ids:%d:%d:0" % (partition, n), partition=partition)
            )
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def live_bodies(first: int, count: int, per_record: int = 1000) -> list[bytes]:
    bodies = []
    for start in range(first, first + count, per_record):
        items = [
            {
                "api_key": "ak_bench",
                "event_id": f"live-{i}-{uuid.UUID(int=i)}",
                "event_type": "signed_up",
                "_timestamp": 1709294400000,
                "user": {"id": f"u{i % 1000}"},
            }
            for i in range(start, min(start + per_record, first + count))
        ]
        bodies.append(orjson.dumps(items))
    return bodies


def live(bootstrap: str, tmp: Path, ids: int, idle_rss: int) -> None:
    """RSS per id with ids emitted by the worker itself (the table grown by splits, as in production)."""
    settings = bench_settings(bootstrap, tmp, worker={"batch_max": 50})
    config = write_config(settings, tmp / f"{settings.worker.app_id}.toml")
    log = tmp / "live.log"
    asyncio.run(ensure_topics(settings, [settings.topics.raw(BULK_SOURCE)]))
    asyncio.run(
        produce_all(
            settings,
            (
                (settings.topics.raw(BULK_SOURCE), body, raw_headers(BULK_SOURCE, 0))
                for body in live_bodies(0, ids)
            ),
        )
    )
    t0 = time.monotonic()
    worker = start_worker(config, log)

    async def drain() -> None:
        async with RecordCounter(settings, settings.topics.canonical) as counter:
            while await counter.read() < ids:
                if worker.poll() is not None:
                    raise SystemExit(log.read_text()[-3000:])

    try:
        asyncio.run(drain())
        rss = rss_bytes(worker.pid)
    finally:
        stop(worker)
    took = time.monotonic() - t0
    print(
        f"  live: {ids:,} ids emitted by the worker in {took:.0f} s; RSS {rss / 2**20:,.0f} MiB = "
        f"{(rss - idle_rss) / ids:.1f} B per id over the idle worker"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: a local one started for the run).")
    parser.add_argument("--ids", type=int, nargs="+", default=[3_000_000, 30_000_000])
    parser.add_argument("--live", type=int, default=0, help="Ids to emit through the worker (0: skip).")
    parser.add_argument("--partitions", type=int, default=12, help="Keyed (and changelog) partitions.")
    args = parser.parse_args()
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    with broker(args.bootstrap) as bootstrap, tempfile.TemporaryDirectory(prefix="headwater-sizing-") as name:
        tmp = Path(name)
        print(
            f"HEAD {git.stdout.strip()}; broker {bootstrap}; {os.cpu_count()} CPUs; "
            f"load {os.getloadavg()[0]:.1f}; {args.partitions} keyed partitions"
        )
        empty = bench_settings(bootstrap, tmp, partitions=args.partitions)
        asyncio.run(ensure_topics(empty, [changelog_topic(empty)], config=changelog_config(empty)))
        config = write_config(empty, tmp / "empty.toml")
        base, _ = asyncio.run(timed_start(empty, config, tmp / "empty.log"))
        print(
            f"baseline (empty changelog): start -> emitting {base.seconds:.2f} s; idle RSS "
            f"{base.rss / 2**20:,.0f} MiB"
        )
        for ids in args.ids:
            settings = bench_settings(bootstrap, tmp, partitions=args.partitions)
            config = write_config(settings, tmp / f"{ids}.toml")
            t0 = time.monotonic()
            asyncio.run(write_changelog(settings, ids))
            print(f"{ids:,} ids: changelog written in {time.monotonic() - t0:.1f} s")
            cold, _ = asyncio.run(timed_start(settings, config, tmp / f"{ids}-cold.log"))
            restore_s = cold.seconds - base.seconds
            print(
                f"  cold restore (empty data dir): start -> emitting {cold.seconds:.2f} s, "
                f"{restore_s:.2f} s over the baseline = {ids / max(restore_s, 1e-3) / 1e6:.2f} M ids/s; "
                f"worker log: {cold.logged}"
            )
            print(f"  RSS {cold.rss / 2**20:,.0f} MiB = {(cold.rss - base.rss) / ids:.1f} B per id over idle")
            disk = du(settings.worker.data_dir)
            print(
                f"  disk (checkpoints after a graceful stop): {disk / 2**20:,.0f} MiB = "
                f"{disk / ids:.1f} B per id"
            )
            warm, _ = asyncio.run(timed_start(settings, config, tmp / f"{ids}-warm.log"))
            print(
                f"  warm restart (its data dir): start -> emitting {warm.seconds:.2f} s "
                f"({warm.seconds - base.seconds:.2f} s over the baseline); worker log: {warm.logged}; "
                f"RSS {(warm.rss - base.rss) / ids:.1f} B per id over idle"
            )
        if args.live:
            live(bootstrap, tmp, args.live, base.rss)


if __name__ == "__main__":
    main()

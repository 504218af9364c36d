"""Dedup table sizing: restore speed from the changelog (memory and RocksDB stores) and RocksDB disk per key.

    .venv/bin/python bench/dedup_sizing.py [--bootstrap HOST:PORT] [--keys 200000] [--skip-rocksdb]

(a) Memory store. N raw customerglu records with unique event ids go straight to raw.customerglu; one
    `headwater worker --source customerglu` runs until all N are on events.canonical, counted as a
    read_committed reader sees them (the dedup changelog then holds one record per transaction with its
    new ids, written in the same transaction as the events) and is stopped. A second worker on the same
    app_id restores the whole
    changelog at start. Right after starting it, one new marker event is produced; its arrival on
    events.canonical (the record's timestamp) marks the end of the restore, since the dedup stage only
    consumes once its partitions' state is restored. The same measurement on an EMPTY changelog (a fresh
    app_id, second start
    as well) is the baseline that is subtracted: restore time = T(full) - T(empty); keys/s = N / that.
    Faust's own "Restoring state..." -> "Done reading from changelog topics" log lines are shown as a check.
(b) RocksDB store (dedup.store = "rocksdb://", rocksdict). Same preload and first run; then `du` of the
    worker's data_dir (as the worker left it, and a flushed + fully compacted copy), bytes per key; a
    restart with the data dir kept (a store that persists its changelog offsets restores almost nothing;
    one that starts empty restores everything) and one with the data dir deleted (restores the whole
    changelog), each against a RocksDB empty-changelog baseline.
Every timed start runs --repeats times (default 3) and the median is used; the worker's own log of its
restore ("restored N entries ... in Xs", or Faust's recovery lines) is printed next to it as a check.
Then a sizing table for windows x event rates: keys in the window, RocksDB disk, full restore time.

Event ids are 36-character UUIDs (real vendor ids look like this), so the keys are b"bench/<uuid>".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

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
from pipeline.kafka.clients import ensure_topics, make_consumer, make_producer

SOURCE = "customerglu"
WORKER_SRC = ROOT  # --worker-src: run the worker from another source tree (e.g. a `git archive` of a commit)


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`headwater worker --source customerglu` from WORKER_SRC, output to `log`."""
    env = {**os.environ, "PYTHONPATH": str(WORKER_SRC)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), "worker", "--source", SOURCE],
        cwd=WORKER_SRC,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


def event_id(i: int) -> str:
    return str(uuid.UUID(int=random.Random(i).getrandbits(128), version=4))


def cg_body(i: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id(i),
            "event_name": "kyc_completed",
            "user_id": f"u{i % 1000}",
            "timestamp": "2024-03-01T12:00:00Z",
            "event_properties": {"level": "full", "n": i},
        }
    )


async def preload(settings: Settings, first: int, count: int) -> None:
    topic = settings.topics.raw(SOURCE)
    await ensure_topics(settings, [topic])
    headers = raw_headers(SOURCE, 0)
    await produce_all(settings, ((topic, cg_body(i), headers) for i in range(first, first + count)))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Start:
    """One timed worker start: process start -> marker on events.canonical."""

    seconds: float
    log_restore: float | None  # Faust's "Restoring state" -> "Done reading from changelog topics", if logged
    rss: int  # worker RSS once the marker is through


async def timed_start(
    settings: Settings, config: Path, log: Path, marker: int, timeout: float = 900
) -> Start:
    """Start a worker, produce one marker event at once, wait for it on events.canonical; stop the worker."""
    from aiokafka import TopicPartition

    canonical = settings.topics.canonical
    consumer = make_consumer(settings, fetch_max_wait_ms=50)
    producer = make_producer(settings)
    await consumer.start()
    await producer.start()
    wanted = event_id(marker)
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(canonical, p) for p in consumer.partitions_for_topic(canonical) or ()]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        started = time.time()
        worker = start_worker(config, log)
        try:
            await (
                await producer.send(
                    settings.topics.raw(SOURCE), cg_body(marker), headers=raw_headers(SOURCE, marker)
                )
            )
            deadline = time.monotonic() + timeout
            while True:
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited with {worker.returncode}:\n{tail(log)}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"the marker did not reach {canonical} in {timeout:.0f}s:\n{tail(log)}")
                batch = await consumer.getmany(timeout_ms=200)
                for record in (r for part in batch.values() for r in part):
                    if orjson.loads(record.value).get("event_id") == wanted:
                        rss = rss_bytes(worker.pid)
                        seconds = record.timestamp / 1000 - started
                        break
                else:
                    continue
                break
        finally:
            stop(worker)
        return Start(seconds, log_restore(log), rss)
    finally:
        await producer.stop()
        await consumer.stop()


REPEATS = 3
_marker = iter(range(10**9, 2 * 10**9))


def timed(settings: Settings, config: Path, log: Path, before: Any = None) -> Start:
    """REPEATS timed starts (each with its own marker); the median of each figure, all values printed."""
    import statistics

    starts = []
    for r in range(REPEATS):
        if before is not None:
            before()
        starts.append(asyncio.run(timed_start(settings, config, log.with_suffix(f".{r}.log"), next(_marker))))
    logged = [s.log_restore for s in starts if s.log_restore is not None]
    print(
        f"    runs: start -> marker {', '.join(f'{s.seconds:.2f}' for s in starts)} s; worker log restore "
        f"{', '.join(f'{x:.2f}' for x in logged) or 'n/a'} s"
    )
    return Start(
        statistics.median(s.seconds for s in starts),
        statistics.median(logged) if logged else None,
        int(statistics.median(s.rss for s in starts)),
    )


_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_OWN_RESTORE = re.compile(r"restored (\d+) entries of .* in ([\d.]+)s")


def log_restore(log: Path) -> float | None:
    """The restore time the worker logged: DedupStage's 'restored N entries ... in Xs' lines (summed), or
    Faust's 'Restoring state from changelog topics' -> 'Done reading from changelog topics' (Faust tables)."""
    begin = end = None
    own = [
        (int(m.group(1)), float(m.group(2))) for m in _OWN_RESTORE.finditer(log.read_text(errors="replace"))
    ]
    if own:
        return sum(seconds for count, seconds in own if count)
    for line in log.read_text(errors="replace").splitlines():
        match = _LOG_TIME.match(line)
        if not match:
            continue
        moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()  # noqa: DTZ007 (logs are in local time)
        if "Restoring state from changelog topics" in line and begin is None:
            begin = moment
        elif "Done reading from changelog topics" in line and begin is not None and end is None:
            end = moment
    return end - begin if begin is not None and end is not None else None


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def first_run(settings: Settings, config: Path, log: Path, keys: int) -> float:
    """Run a worker until `keys` events are canonical; stop it. Returns the seconds it took."""
    t0 = time.monotonic()
    worker = start_worker(config, log)

    async def drain() -> None:
        deadline = time.monotonic() + 1200
        async with RecordCounter(settings, settings.topics.canonical) as counter:
            while (count := await counter.read()) < keys:
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited with {worker.returncode}:\n{tail(log)}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {count} of {keys} events canonical after 1200 s:\n{tail(log)}")

    try:
        asyncio.run(drain())
    finally:
        stop(worker)
    return time.monotonic() - t0


def du(path: Path) -> int:
    """Bytes on disk (du -s --block-size=1)."""
    if not path.exists():
        return 0
    out = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def du_by_kind(path: Path) -> dict[str, int]:
    kinds: dict[str, int] = {"sst": 0, "wal": 0, "other": 0}
    for file in path.rglob("*"):
        if file.is_file():
            kind = "sst" if file.suffix == ".sst" else "wal" if file.suffix == ".log" else "other"
            kinds[kind] += file.stat().st_blocks * 512
    return kinds


def compacted_copy(data_dir: Path, target: Path) -> tuple[int, int]:
    """Copy the data dir, flush + compact every RocksDB in the copy; (bytes on disk, keys counted)."""
    import rocksdict

    shutil.copytree(data_dir, target)
    keys = 0
    for current in target.rglob("CURRENT"):
        try:
            db = rocksdict.Rdict(str(current.parent))
        except Exception:  # noqa: BLE001 - a raw-mode database (Faust's store)
            db = rocksdict.Rdict(str(current.parent), options=rocksdict.Options(raw_mode=True))
        try:
            db.flush()
            db.compact_range(None, None)
            keys += sum(1 for k in db.keys() if b"__faust" not in (k if isinstance(k, bytes) else b""))
        finally:
            db.close()
    return du(target), keys


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n:,.1f} TB"


def human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    return f"{s / 3600:,.1f} h"


def baseline(bootstrap: str, tmp: Path, store: str, label: str) -> Start:
    """A worker's second start on an empty changelog (fresh app_id): start-up without restore work."""
    settings = bench_settings(bootstrap, tmp, dedup={"store": store})
    config = write_config(settings, tmp / f"{settings.worker.app_id}.toml")
    asyncio.run(preload(settings, 0, 1))
    first_run(settings, config, tmp / f"{settings.worker.app_id}-first.log", 1)
    start = timed(settings, config, tmp / f"{settings.worker.app_id}-timed.log")
    print(
        f"  {label}: worker start -> marker canonical {start.seconds:.2f} s "
        f"(worker log: restore {fmt(start.log_restore)}; RSS {human_bytes(start.rss)})"
    )
    return start


def fmt(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: a local one started for the run).")
    parser.add_argument("--keys", type=int, default=200_000, help="Unique event ids preloaded (N).")
    parser.add_argument("--skip-rocksdb", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="Timed starts per case (the median is used).")
    parser.add_argument(
        "--worker-src",
        type=Path,
        default=ROOT,
        help="Source tree to run the worker from (default: this checkout).",
    )
    args = parser.parse_args()
    global WORKER_SRC, REPEATS
    WORKER_SRC = args.worker_src.resolve()
    REPEATS = args.repeats
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--short", "pipeline"], capture_output=True, text=True
    )
    print(
        f"worker from {WORKER_SRC}"
        + (
            f" (checkout HEAD {git.stdout.strip()}; modified: "
            f"{' '.join(dirty.stdout.split()[1::2]) or 'none'})"
            if WORKER_SRC == ROOT
            else ""
        )
    )
    n = args.keys
    results: dict[str, Any] = {}
    with (
        broker(args.bootstrap) as bootstrap,
        tempfile.TemporaryDirectory(prefix="headwater-bench-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        print(
            f"broker {bootstrap}; N = {n:,} unique ids (key b'bench/<uuid4>', "
            f"{len(f'bench/{event_id(0)}')} bytes); "
            f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
        )

        # (a) memory store ------------------------------------------------------------------------------
        print("(a) memory store")
        base_mem = baseline(bootstrap, tmp, "memory://", "memory, empty changelog")
        settings = bench_settings(bootstrap, tmp)
        config = write_config(settings, tmp / f"{settings.worker.app_id}.toml")
        asyncio.run(preload(settings, 0, n))
        took = first_run(settings, config, tmp / "memory-first.log", n)
        print(f"  first run: {n:,} events canonical in {took:.1f} s (incl. start-up)")
        full = timed(settings, config, tmp / "memory-restore.log")
        restore = full.seconds - base_mem.seconds
        print(
            f"  memory, {n:,} keys in changelog: worker start -> marker canonical {full.seconds:.2f} s "
            f"(worker log: restore {fmt(full.log_restore)}; RSS {human_bytes(full.rss)})"
        )
        rate = n / restore if restore > 0 else float("nan")
        print(
            f"  restore time {restore:.2f} s (minus the empty-changelog baseline) -> {rate:,.0f} keys/s "
            "(one changelog record per transaction)"
        )
        if full.log_restore:
            print(f"  by the worker log: {n / full.log_restore:,.0f} keys/s")
        print(
            f"  RSS over the baseline worker: {human_bytes(full.rss - base_mem.rss)} "
            f"= {(full.rss - base_mem.rss) / n:,.0f} bytes/key (rough)"
        )
        results["memory"] = rate
        results["memory_log"] = n / full.log_restore if full.log_restore else None
        results["ram"] = (full.rss - base_mem.rss) / n

        # (b) rocksdb ----------------------------------------------------------------------------------
        if not args.skip_rocksdb:
            print("(b) rocksdb store (rocksdict)")
            try:
                rocks(bootstrap, tmp, n, results)
            except SystemExit as exc:
                print(f"  RocksDB FAILED: {exc}")

        sizing_table(results)


def rocks(bootstrap: str, tmp: Path, n: int, results: dict[str, Any]) -> None:
    base = baseline(bootstrap, tmp, "rocksdb://", "rocksdb, empty changelog")
    settings = bench_settings(bootstrap, tmp, dedup={"store": "rocksdb://"})
    config = write_config(settings, tmp / f"{settings.worker.app_id}.toml")
    data_dir = settings.worker.data_dir
    asyncio.run(preload(settings, 0, n))
    took = first_run(settings, config, tmp / "rocksdb-first.log", n)
    print(f"  first run: {n:,} events canonical in {took:.1f} s (incl. start-up)")
    left = du(data_dir)
    kinds = du_by_kind(data_dir)
    dbs = (
        sorted(str(c.parent.relative_to(data_dir)) for c in data_dir.rglob("CURRENT"))
        if data_dir.exists()
        else []
    )
    print(f"  RocksDB databases under data_dir: {dbs or 'NONE'}")
    if not dbs:
        raise SystemExit(
            "dedup.store = 'rocksdb://' left no RocksDB under worker.data_dir: this worker does not "
            "keep the dedup table in RocksDB"
        )
    compacted, counted = compacted_copy(data_dir, tmp / "rocksdb-compacted")
    print(
        f"  data_dir as the worker left it: {human_bytes(left)} = {left / n:,.1f} bytes/key "
        f"(sst {human_bytes(kinds['sst'])}, WAL {human_bytes(kinds['wal'])}, other "
        f"{human_bytes(kinds['other'])})"
    )
    print(
        f"  flushed + compacted copy: {human_bytes(compacted)} = {compacted / n:,.1f} bytes/key "
        f"({counted:,} keys found in the DBs)"
    )
    results["disk_left"] = left / n
    results["disk_compacted"] = compacted / n

    kept = timed(settings, config, tmp / "rocksdb-kept.log")
    print(
        f"  restart, data dir kept: start -> marker {kept.seconds:.2f} s, restore "
        f"{kept.seconds - base.seconds:+.2f} s "
        f"over the baseline (worker log: restore {fmt(kept.log_restore)})"
    )
    full = timed(settings, config, tmp / "rocksdb-full.log", before=lambda: shutil.rmtree(data_dir, True))
    restore = full.seconds - base.seconds
    rate = n / restore if restore > 0 else float("nan")
    print(
        f"  restart, data dir deleted: start -> marker {full.seconds:.2f} s, restore {restore:.2f} s "
        f"-> {rate:,.0f} keys/s (worker log: restore {fmt(full.log_restore)}"
        + (f" = {n / full.log_restore:,.0f} keys/s)" if full.log_restore else ")")
    )
    after = du(data_dir)
    print(f"  data_dir after the full restore: {human_bytes(after)} = {after / n:,.1f} bytes/key")
    results["rocksdb"] = rate
    results["rocksdb_log"] = n / full.log_restore if full.log_restore else None


def sizing_table(results: dict[str, Any]) -> None:
    windows = (("1h", 3600), ("24h", 86400), ("7d", 7 * 86400))
    rates = (100, 1_000, 10_000)
    disk = results.get("disk_compacted")
    disk_left = results.get("disk_left")
    print()
    print("sizing (every event a new id; keys = rate x window; restore at the measured keys/s)")
    print(
        f"  measured: memory restore {results.get('memory', float('nan')):,.0f} keys/s; rocksdb restore "
        f"{results.get('rocksdb', float('nan')):,.0f} keys/s; rocksdb disk {disk or float('nan'):,.1f} B/key "
        f"compacted, {disk_left or float('nan'):,.1f} B/key as left by the worker"
    )
    ram = results.get("ram")
    print(
        f"  measured by the worker's own restore log: memory "
        f"{results.get('memory_log') or float('nan'):,.0f} keys/s, "
        f"rocksdb {results.get('rocksdb_log') or float('nan'):,.0f} keys/s; memory store RSS "
        f"~{ram or float('nan'):,.0f} B/key"
    )
    print(
        f"  {'window':>6} {'rate/s':>7} {'keys':>15} {'rocksdb disk':>13} {'(as left)':>11} "
        f"{'memory RSS':>11} "
        f"{'restore memory':>15} {'restore rocksdb':>16}"
    )
    for name, seconds in windows:
        for rate in rates:
            keys = rate * seconds
            d = human_bytes(keys * disk) if disk else "n/a"
            dl = human_bytes(keys * disk_left) if disk_left else "n/a"
            rm = human_seconds(keys / results["memory"]) if results.get("memory", 0) > 0 else "n/a"
            rr = human_seconds(keys / results["rocksdb"]) if results.get("rocksdb", 0) > 0 else "n/a"
            mr = human_bytes(keys * ram) if ram else "n/a"
            print(f"  {name:>6} {rate:>7,} {keys:>15,} {d:>13} {dl:>11} {mr:>11} {rm:>15} {rr:>16}")
    print(
        "  (restore is for the whole table on one worker; with W workers each restores ~1/W of the "
        "partitions. One changelog record per transaction, with its ids; the broker's retention deletes it.)"
    )


if __name__ == "__main__":
    main()

"""Pipeline throughput: one worker process vs a bare consume -> orjson parse -> produce loop.

    .venv/bin/python bench/worker.py [--bootstrap HOST:PORT] [--single N] [--bulk N] [--profile] [--repeat
    N]

Starts one `headwater worker` process on fresh topics, warms it up with one record per source (so
its consumer groups are stable), freezes it (SIGSTOP), preloads raw records into raw.<source> (single-event
records from all seven
sources, then 100-event records from the sources that batch) and runs the baseline: a bare aiokafka
loop that consumes the same raw records, parses them with orjson and produces one record per event
(acks=all, awaited per batch). Then it releases the worker (SIGCONT) and measures canonical events/s
from that moment to the last canonical record, so the worker's every stage is in the figure (start-up
excluded, as the baseline's is). Nothing reads events.canonical meanwhile: the benchmark polls the worker's
committed offsets, and reads the canonical records (their count and times) once the worker is done. Once the
worker has stopped, the baseline runs again over the same
records, and the worker is compared with the mean of its two runs (this host's speed drifts by up to 2x
within a minute, so one baseline run before the worker could meet another host than the worker did).
Prints both rates and worker/bare, and CPU time per event of each
(worker process from /proc; the baseline's own process time), which a shared, noisy machine disturbs
less than the rates. The "canonical span" rate (first to last canonical record) is printed as well: it
leaves out the work done before the first event comes out, so it flatters a worker whose last stage is
fast. --profile samples the worker with py-spy (installed on demand) and prints the top functions.
--repeat N runs the cases N times, alternating, on one broker, and prints the median of each ratio: on a
shared host the bare loop's rate moves more than the worker's (16-34 us of CPU per event between runs).
--compare DIR also runs each case with the worker of another checkout (e.g. a `git worktree` of main),
next to this tree's (which goes first alternates), so that two versions meet the same noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from aiokafka import TopicPartition
from common import (
    BULK_SOURCES,
    SINGLE_SOURCES,
    RecordCounter,
    bench_settings,
    body,
    broker,
    cpu_seconds,
    headwater,
    print_profile,
    produce_all,
    py_spy,
    raw_headers,
    stop,
    write_config,
)

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_consumer, make_producer
from pipeline.kafka.reading import end_offsets


async def preload(settings: Settings, sources: tuple[str, ...], records: int, per_record: int) -> int:
    """Write `records` raw records per source; returns the number of events they carry."""
    await ensure_topics(settings, [settings.topics.raw(s) for s in sources])
    count = {s: per_record if s in BULK_SOURCES else 1 for s in sources}
    await produce_all(
        settings,
        (
            (settings.topics.raw(s), body(s, r * count[s], count[s]), raw_headers(s, r))
            for s in sources
            for r in range(records)
        ),
    )
    return sum(records * count[s] for s in sources)


async def bare_loop(
    settings: Settings, sources: tuple[str, ...], events: int, out_topic: str, run: str
) -> tuple[float, float]:
    """Consume the raw topics from the start (consumer group `run`), orjson-parse every body, produce one
    record per event; (events/s, CPU seconds of this process from the first record on)."""
    import orjson

    await ensure_topics(settings, [out_topic])
    consumer = make_consumer(
        settings,
        *(settings.topics.raw(s) for s in sources),
        group_id=f"{settings.worker.app_id}-{run}",
        max_poll_records=2000,
    )
    producer = make_producer(settings, linger_ms=5, max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    done = 0
    started: float | None = None
    cpu_started = time.process_time()
    try:
        while done < events:
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            acks = []
            for part in batch.values():
                for record in part:
                    if started is None:
                        started, cpu_started = time.monotonic(), time.process_time()
                    doc = orjson.loads(record.value)
                    items = (
                        doc if isinstance(doc, list) else doc.get("events") or doc.get("profiles") or [doc]
                    )
                    for item in items:
                        acks.append(await producer.send(out_topic, orjson.dumps(item)))
            await asyncio.gather(*acks)
            done += len(acks)
            if batch:
                await consumer.commit()
        return events / (time.monotonic() - (started or time.monotonic())), time.process_time() - cpu_started
    finally:
        await producer.stop()
        await consumer.stop()


def give_up_if_stuck(worker: subprocess.Popen[bytes], log: Path, deadline: float, waiting_to: str) -> None:
    """End the benchmark, showing the worker's log, if the worker exited or the wait passed its deadline."""
    if worker.poll() is not None:
        print(log.read_text(errors="replace")[-3000:])
        raise SystemExit(f"the worker exited with {worker.returncode}")
    if time.monotonic() > deadline:
        print(log.read_text(errors="replace")[-3000:])
        raise SystemExit(f"the worker did not {waiting_to}")


async def drain_canonical(
    settings: Settings,
    events: int,
    worker: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 600,
    since_s: float = 0.0,
) -> tuple[int, float, float]:
    """Read events.canonical (read_committed, like every reader of ours) until `events` records are there;
    (records, the first and the last time of a canonical record written after `since_s`, epoch seconds).

    Records are counted as read, not by end offsets: transaction markers take offsets too."""
    deadline = time.monotonic() + timeout_s
    first, last = None, None
    async with RecordCounter(settings, settings.topics.canonical) as counter:
        while counter.count < events:
            give_up_if_stuck(
                worker, log, deadline, f"drain {events} events in {timeout_s:.0f} s ({counter.count})"
            )
            for record in await counter.records(0.5):
                if record.timestamp < since_s * 1000:
                    continue
                first = record.timestamp if first is None else min(first, record.timestamp)
                last = record.timestamp if last is None else max(last, record.timestamp)
    return counter.count, (first or 0) / 1000, (last or 0) / 1000


async def raw_end_offsets(settings: Settings, sources: tuple[str, ...]) -> dict[TopicPartition, int]:
    """TopicPartition -> end offset of every raw topic, read before the worker is released: one client per
    topic, which would otherwise start and stop beside the worker while it is timed."""
    return {
        TopicPartition(settings.topics.raw(s), p): end
        for s in sources
        for p, end in (await end_offsets(settings, settings.topics.raw(s))).items()
    }


async def wait_until_committed(
    settings: Settings,
    raw_ends: dict[TopicPartition, int],
    worker: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 600,
) -> None:
    """Return once the worker has committed every record: the normalize group every raw record, then the
    dedup group every keyed record (its offsets are committed in the transactions that write the canonical
    events, so every event is then on events.canonical, committed). Polls the groups' committed offsets
    every 50 ms and reads no records: a reader of events.canonical running beside the worker took CPU from
    it (and from the broker) on this 2-core host, while the baseline runs alone."""
    from aiokafka.admin import AIOKafkaAdminClient

    app = settings.worker.app_id
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        for group, ends in ((f"{app}-normalize", raw_ends), (f"{app}-dedup", None)):
            if ends is None:  # final once every raw record is committed: its outputs were acked before that
                ends = {
                    TopicPartition(settings.topics.keyed, p): end
                    for p, end in (await end_offsets(settings, settings.topics.keyed)).items()
                }
            while True:
                committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
                if all(
                    end == 0 or (tp in committed and committed[tp].offset >= end) for tp, end in ends.items()
                ):
                    break
                give_up_if_stuck(worker, log, deadline, f"commit its input in {timeout_s:.0f} s ({group})")
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


PROBE = 900_000_000  # event indexes of the warm-up records, far from the measured ones


def warm_up(settings: Settings, worker: subprocess.Popen[bytes], log: Path) -> int:
    """One single-event record per source through the worker: once all are out, every stage has its
    partitions (the groups are stable). Returns the number of canonical events it made."""
    probes = [
        (settings.topics.raw(s), body(s, PROBE + n, 1), raw_headers(s, PROBE + n))
        for n, s in enumerate(SINGLE_SOURCES)
    ]
    asyncio.run(ensure_topics(settings, [topic for topic, _, _ in probes]))  # the worker may not have yet
    asyncio.run(produce_all(settings, probes))
    asyncio.run(drain_canonical(settings, len(probes), worker, log, timeout_s=120))
    time.sleep(1)
    return len(probes)


def run_case(
    bootstrap: str,
    tmp: Path,
    label: str,
    sources: tuple[str, ...],
    records: int,
    per_record: int,
    profile: bool,
    tree: Path | None = None,
) -> dict[str, float]:
    # A frozen worker sends no heartbeats: the session outlasts the preload and the baseline.
    settings = bench_settings(bootstrap, tmp, worker={"session_timeout_s": 30})
    config = write_config(settings, tmp / f"{settings.worker.app_id}.toml")
    log = tmp / f"{settings.worker.app_id}.log"
    worker = headwater(config, "worker", log=log, tree=tree)
    spy = None
    try:
        probes = warm_up(settings, worker, log)
        os.kill(worker.pid, signal.SIGSTOP)
        events = asyncio.run(preload(settings, sources, records, per_record))
        raw_ends = asyncio.run(raw_end_offsets(settings, sources))
        out_topic = f"{settings.worker.app_id}.bare-out"
        bare_before, bare_cpu_before = asyncio.run(bare_loop(settings, sources, events, out_topic, "bare"))
        if profile:
            folded = tmp / f"{label}.folded"
            spy = subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(folded),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        cpu_before, released = cpu_seconds(worker.pid), time.time()
        os.kill(worker.pid, signal.SIGCONT)
        asyncio.run(wait_until_committed(settings, raw_ends, worker, log))
        cpu = cpu_seconds(worker.pid) - cpu_before
        # Now, with the worker done, read what it wrote: the count, and the times of its first and last event.
        count, first, last = asyncio.run(
            drain_canonical(settings, probes + events, worker, log, timeout_s=60, since_s=released)
        )
        count -= probes
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGCONT)
        stop(worker)
    # The baseline again, over the same records, once the worker has stopped: this host's speed drifts by
    # up to 2x within a minute, so the worker is compared with the mean of a run before and one after it.
    bare_after, bare_cpu_after = asyncio.run(bare_loop(settings, sources, events, out_topic, "bare-after"))
    bare, bare_cpu = (bare_before + bare_after) / 2, (bare_cpu_before + bare_cpu_after) / 2
    rate = count / (last - released)
    span = count / (last - first) if last > first else float("inf")
    print(
        f"{label:>7}: {events} events in {records} records/source x {len(sources)} sources | worker "
        f"{rate:>9,.0f} ev/s | bare loop {bare:>9,.0f} ev/s (before {bare_before:,.0f}, after "
        f"{bare_after:,.0f}) | ratio worker/bare {rate / bare:.2f}"
    )
    worker_us, bare_us = cpu / count * 1e6, bare_cpu / events * 1e6
    print(
        f"{'':>9}CPU per event: worker {worker_us:.1f} us, bare loop {bare_us:.1f} us"
        f" (ratio bare/worker {bare_us / worker_us:.2f}) | canonical span alone "
        f"{span:,.0f} ev/s ({span / bare:.2f} x bare)"
    )
    if spy is not None:
        print_profile(folded, f"worker, {label}", 15, ("pipeline/", "adapters/", "faust/", "aiokafka/"))
    return {
        "events": events,
        "worker": rate,
        "bare": bare,
        "ratio": rate / bare,
        "cpu_ratio": bare_us / worker_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: a local one started for the run).")
    parser.add_argument("--single", type=int, default=10_000, help="Single-event raw records per source.")
    parser.add_argument("--bulk", type=int, default=500, help="100-event raw records per batching source.")
    parser.add_argument("--profile", action="store_true", help="Sample the worker with py-spy.")
    parser.add_argument("--only", choices=("single", "bulk"), help="Run one case.")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="Run the cases N times, alternating, and print the median ratios (a noisy host).",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="Also run each case with the worker of the checkout in DIR, alternating.",
    )
    args = parser.parse_args()
    if args.profile:
        py_spy()  # installed before the broker starts
    cases = [
        c
        for c in (("single", SINGLE_SOURCES, args.single, 1), ("bulk", BULK_SOURCES, args.bulk, 100))
        if args.only in (None, c[0])
    ]
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.compare:
        trees.append((f"@{args.compare.name}", args.compare.resolve()))
    results: dict[str, list[dict[str, float]]] = {
        label + name: [] for label, *_ in cases for name, _ in trees
    }
    with broker(args.bootstrap) as bootstrap, tempfile.TemporaryDirectory(prefix="headwater-bench-") as tmp:
        for turn in range(args.repeat):
            for label, sources, records, per_record in cases:
                for name, tree in trees if turn % 2 == 0 else trees[::-1]:  # neither tree always goes first
                    results[label + name].append(
                        run_case(
                            bootstrap,
                            Path(tmp),
                            label + name,
                            sources,
                            records,
                            per_record,
                            args.profile,
                            tree,
                        )
                    )
    if args.repeat > 1 or args.compare:
        for label, runs in results.items():
            print(
                f"{label:>7}: median of {len(runs)} runs: ratio worker/bare "
                f"{statistics.median(r['ratio'] for r in runs):.2f}, CPU ratio bare/worker "
                f"{statistics.median(r['cpu_ratio'] for r in runs):.2f} (each: "
                + ", ".join(f"{r['ratio']:.2f}" for r in runs)
                + ")"
            )


if __name__ == "__main__":
    main()

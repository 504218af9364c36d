"""Freshness: receipt -> visible on events.canonical, p50 and p99, at half of one worker's peak rate.

    .venv/bin/python bench/freshness.py [--bootstrap HOST:PORT] [--rate N] [--seconds S] [--peak-events N]

Starts one `headwater worker` on fresh topics and waits until it owns its partitions. Peak: preloads
--peak-events single-event Segment records while the worker is stopped (SIGSTOP), then times its drain
of them (canonical events/s).
Then it writes single-event records at half that rate (or --rate) for --seconds, each stamped with its
send time as received_at, as the receiver stamps a request when it arrives; a read_committed consumer
takes each canonical event as it becomes visible, and the figure per event is (visible - received_at).
It also prints the worker's own headwater_worker_freshness_seconds over the paced phase (receipt ->
the dedup transaction's commit), as p50/p99 read from its buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import orjson
from common import (
    RecordCounter,
    bench_settings,
    body,
    broker,
    headwater,
    produce_all,
    raw_headers,
    stop,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.kafka.local import free_port
from pipeline.ops import ready

SOURCE = "segment"


def wait_until_ready(url: str, worker: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}")
        if not ready.stages_waiting([ready.health(f"{url}/health")]):
            return
        time.sleep(0.2)
    raise SystemExit("the worker did not own its partitions in time")


async def drain(settings: Settings, events: int, timeout_s: float = 600) -> float:
    """Events/s until `events` canonical events are visible (fresh topics: counted from the start)."""
    async with RecordCounter(settings, settings.topics.canonical) as counter:
        started = time.monotonic()
        while await counter.read(0.25) < events:
            if time.monotonic() - started > timeout_s:
                raise SystemExit(f"only {counter.count} of {events} events within {timeout_s}s")
        return events / (time.monotonic() - started)


async def paced(settings: Settings, rate: float, seconds: float, first: int) -> list[float]:
    """Write single-event records at `rate` for `seconds` while reading canonical; per-event latencies."""
    topic = settings.topics.raw(SOURCE)
    total = int(rate * seconds)
    latencies: list[float] = []
    producer = make_producer(settings, linger_ms=0)
    await producer.start()

    async def write() -> None:
        started = time.monotonic()
        for n in range(total):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(topic, body(SOURCE, first + n, 1), headers=raw_headers(SOURCE, first + n))

    async with RecordCounter(settings, settings.topics.canonical) as counter:
        await counter.read(0.5)  # skip what the peak phase made
        skip = counter.count
        writer = asyncio.create_task(write())
        deadline = time.monotonic() + seconds + 60
        while counter.count < skip + total and time.monotonic() < deadline:
            for record in await counter.records(0.05):
                seen = time.time()
                received = datetime.fromisoformat(orjson.loads(record.value)["received_at"]).timestamp()
                latencies.append(seen - received)
        await writer
    await producer.stop()
    return latencies


def histogram(url: str) -> dict[float, float]:
    """The worker's freshness buckets (le -> cumulative count), summed over sources."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "headwater_worker_freshness_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0) + sample.value
    return buckets


def quantile(buckets: dict[float, float], q: float) -> float:
    """histogram_quantile as Prometheus computes it (linear within the bucket)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return previous_bound
            share = (rank - previous_count) / max(buckets[bound] - previous_count, 1e-9)
            return previous_bound + (bound - previous_bound) * share
        previous_bound, previous_count = bound, buckets[bound]
    return previous_bound


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: one of its own for the run).")
    parser.add_argument("--rate", type=float, help="Events/s of the paced phase (default: half the peak).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Length of the paced phase.")
    parser.add_argument("--peak-events", type=int, default=20_000, help="Events the peak is measured on.")
    parser.add_argument(
        "--worker-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A [worker] setting for the run, e.g. batch_within_s=0.01 (repeatable).",
    )
    args = parser.parse_args()
    overrides = {
        k: float(v) if "." in v else int(v) for k, _, v in (o.partition("=") for o in args.worker_option)
    }
    with broker(args.bootstrap) as bootstrap, tempfile.TemporaryDirectory(prefix="headwater-fresh-") as tmp:
        port = free_port()
        settings = bench_settings(bootstrap, Path(tmp), worker={"web_port": port, **overrides})
        config = write_config(settings, Path(tmp) / "worker.toml")
        asyncio.run(ensure_topics(settings, [settings.topics.raw(SOURCE)]))
        worker = headwater(config, "worker", "--source", SOURCE, log=Path(tmp) / "worker.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, worker)
            rate = args.rate
            if rate is None:
                n = args.peak_events
                records = [
                    (settings.topics.raw(SOURCE), body(SOURCE, i, 1), raw_headers(SOURCE, i))
                    for i in range(n)
                ]
                worker.send_signal(signal.SIGSTOP)  # preload first, then time the worker alone
                try:
                    asyncio.run(produce_all(settings, records))
                finally:
                    worker.send_signal(signal.SIGCONT)
                peak = asyncio.run(drain(settings, n))
                rate = peak / 2
                print(
                    f"peak: {peak:,.0f} events/s over {n:,} preloaded single events; paced at {rate:,.0f}/s"
                )
            before = histogram(url)
            latencies = asyncio.run(paced(settings, rate, args.seconds, first=10_000_000))
            after = histogram(url)
        finally:
            stop(worker)
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"{len(latencies):,} events at {rate:,.0f}/s for {args.seconds:.0f}s: receipt -> visible on "
        f"events.canonical p50 {cuts[49] * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )
    delta = {le: after[le] - before.get(le, 0) for le in after}
    print(
        "worker histogram (receipt -> commit) over the paced phase: "
        f"p50 {quantile(delta, 0.5) * 1000:.0f} ms, p99 {quantile(delta, 0.99) * 1000:.0f} ms"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()

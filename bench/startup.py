"""Spawn -> processing: how long a fresh `headwater worker` takes to put a waiting event on events.canonical.

As a user meets it: an event is already waiting on raw.segment (fresh topics, an idle broker), the worker
is spawned from an empty directory, and the clock runs until the event can be read (read_committed) from
events.canonical. The worker's log lines are timestamped as they arrive, so the report shows where the
time went (start-up, the stages' group joins, the web server).

    .venv/bin/python bench/startup.py --runs 2            # on a broker of its own
    .venv/bin/python bench/startup.py --bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, RecordCounter, bench_settings, body, broker, produce_all, raw_headers, write_config
from rigs.kafka import die_with_parent

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics
from pipeline.kafka.local import free_port

EXTRA: list[str] = []


def timestamped_lines(process: subprocess.Popen[bytes], start: float, into: list[tuple[float, str]]) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        into.append((time.monotonic() - start, raw.decode(errors="replace").rstrip()))


async def first_canonical(settings: Settings, start: float, timeout_s: float) -> float:
    async with RecordCounter(settings, settings.topics.canonical) as canonical:
        deadline = start + timeout_s
        while time.monotonic() < deadline:
            if await canonical.read(0.05):
                return time.monotonic() - start
    raise SystemExit(f"no canonical event within {timeout_s:.0f}s")


def run_once(bootstrap: str, tmp: Path, timeout_s: float) -> float:
    settings = bench_settings(bootstrap, tmp, worker={"web_port": free_port()})
    config = write_config(settings, tmp / f"{settings.worker.app_id}.toml")
    asyncio.run(ensure_topics(settings, [settings.topics.raw("segment")]))
    asyncio.run(
        produce_all(
            settings, [(settings.topics.raw("segment"), body("segment", 0, 1), raw_headers("segment", 0))]
        )
    )
    empty = tmp / f"{settings.worker.app_id}-cwd"
    empty.mkdir()
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), *EXTRA, "worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=empty,
        preexec_fn=die_with_parent,
    )
    reader = threading.Thread(target=timestamped_lines, args=(worker, start, lines), daemon=True)
    reader.start()
    try:
        elapsed = asyncio.run(first_canonical(settings, start, timeout_s))
    finally:
        worker.terminate()
        worker.wait(30)
        reader.join(5)
    for at, line in lines:
        print(f"  {at:6.2f}s  {line[:150]}")
    print(f"spawn -> first canonical event: {elapsed:.2f}s", flush=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: one of its own for the run).")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="Give up after this many seconds.")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with broker(args.bootstrap) as bootstrap, tempfile.TemporaryDirectory(prefix="headwater-startup-") as tmp:
        figures = [run_once(bootstrap, Path(tmp), args.timeout) for _ in range(args.runs)]
    print("spawn -> processing: " + ", ".join(f"{f:.2f}s" for f in figures))


if __name__ == "__main__":
    main()

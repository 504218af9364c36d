"""Throughput of 1 vs 2 worker processes: preload raw records, let the workers drain them, compare.

    .venv/bin/python bench/scale.py [--events 60000] [--partitions 6] [--workers 1 2]

Starts its own single-node broker (pipeline.kafka.local, free ports, a temp dir) and stops it at the end.
For each worker count: fresh topics and consumer groups, N raw records preloaded to raw.customerglu
(one event per record, as the receiver writes a single-event request; 5% repeats of earlier ids), then
`headwater worker --source customerglu` x W until every distinct id is on events.canonical.

events/s is measured from the first canonical event to the last, so process start-up, group join and
table recovery are left out; the wall time including them is printed too. On one machine the broker,
the workers and this script share the cores: the scaling factor is a floor for workers on their own hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import RecordCounter, produce_all  # noqa: E402
from rigs.kafka import toml_text  # noqa: E402

from pipeline.config import LocalKafkaSettings, Settings  # noqa: E402
from pipeline.kafka.clients import ensure_topics  # noqa: E402
from pipeline.kafka.local import LocalKafka, free_port  # noqa: E402
from pipeline.records import (  # noqa: E402
    RawHeaders,
    new_request_id,  # noqa: E402
    utc_now,
)

SOURCE = "customerglu"
REPEAT_EVERY = 20  # every 20th record repeats an earlier id: dedup has real work


def settings_for(bootstrap: str, run: str, partitions: int, data_dir: Path) -> Settings:
    prefix = f"bench_{run}_{uuid.uuid4().hex[:6]}"
    return Settings.model_validate(
        {
            "kafka": {"bootstrap_servers": bootstrap, "partitions": partitions},
            "local_kafka": {"enabled": False},
            "topics": {
                "raw_prefix": f"{prefix}.raw.",
                "canonical": f"{prefix}.canonical",
                "dlq": f"{prefix}.dlq",
                "keyed": f"{prefix}.keyed",
                "replay_results": f"{prefix}.replay-results",
            },
            "worker": {"app_id": prefix, "data_dir": str(data_dir / prefix), "web_port": 0},
            "tenants": [{"id": "bench", "write_keys": ["wk_bench"]}],
        }
    )


def bodies(count: int) -> tuple[list[bytes], int]:
    """`count` raw bodies and how many distinct event ids they hold."""
    out = []
    for i in range(count):
        n = i // 2 if i % REPEAT_EVERY == REPEAT_EVERY - 1 else i
        out.append(
            orjson.dumps(
                {
                    "event_id": f"b_{n}",
                    "event_name": "tick",
                    "user_id": f"u{n % 997}",
                    "timestamp": 1709294400 + n,
                    "event_properties": {"n": n, "plan": "pro"},
                }
            )
        )
    distinct = len({orjson.loads(b)["event_id"] for b in out})
    return out, distinct


async def preload(settings: Settings, records: list[bytes]) -> None:
    topics = settings.topics
    await ensure_topics(settings, [topics.raw(SOURCE), topics.keyed, topics.canonical, topics.dlq])

    def with_headers(body: bytes) -> tuple[str, bytes, list[tuple[str, bytes]]]:
        headers = RawHeaders(
            tenant="bench",
            source=SOURCE,
            received_at=utc_now(),
            request_id=new_request_id(),
            content_type="application/json",
        )
        return topics.raw(SOURCE), body, headers.to_kafka()

    await produce_all(settings, map(with_headers, records))


def run(
    settings: Settings, workers: int, expected: int, config_dir: Path, timeout_s: float
) -> dict[str, Any]:
    """Start `workers` processes on preloaded topics; time the drain."""
    config = config_dir / f"{settings.worker.app_id}.toml"
    config.write_text(toml_text(settings))
    logs = [(config_dir / f"{settings.worker.app_id}.{n}.log").open("wb") for n in range(workers)]
    command = [sys.executable, "-m", "pipeline.cli", "--config", str(config), "worker", "--source", SOURCE]
    started = time.monotonic()
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT) for log in logs]

    async def drain() -> tuple[float, int, float]:
        """Count events.canonical as read (read_committed) until every distinct id is there."""
        first_at = first_count = None
        async with RecordCounter(settings, settings.topics.canonical) as counter:
            while (count := await counter.read()) < expected:
                if time.monotonic() - started > timeout_s:
                    raise RuntimeError(
                        f"{workers} worker(s): only {count} of {expected} canonical "
                        f"after {timeout_s:.0f}s (logs in {config_dir})"
                    )
                if any(p.poll() is not None for p in processes):
                    raise RuntimeError(f"a worker exited early (logs in {config_dir})")
                if count and first_at is None:
                    first_at, first_count = time.monotonic(), count
        assert first_at is not None and first_count is not None
        return first_at, first_count, time.monotonic()

    try:
        first_at, first_count, done_at = asyncio.run(drain())
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
    drain_s = max(done_at - first_at, 1e-6)
    return {
        "workers": workers,
        "events_per_s": (expected - first_count) / drain_s,
        "drain_s": drain_s,
        "wall_s": done_at - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=60_000, help="raw records per run (default 60000)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic (default 6)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run (default 1 2)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run before giving up")
    args = parser.parse_args()

    records, distinct = bodies(args.events)
    with tempfile.TemporaryDirectory(prefix="headwater-bench-") as tmp:
        work = Path(tmp)
        broker = LocalKafka(
            LocalKafkaSettings(port=free_port(), controller_port=free_port(), data_dir=work / "kafka")
        )
        broker.up(bound_to_parent=True)
        bootstrap = f"127.0.0.1:{broker.settings.port}"
        results = []
        try:
            for workers in args.workers:
                settings = settings_for(bootstrap, f"w{workers}", args.partitions, work)
                loaded = time.monotonic()
                asyncio.run(preload(settings, records))
                print(
                    f"preloaded {len(records)} raw records ({distinct} distinct ids) in "
                    f"{time.monotonic() - loaded:.1f}s; running {workers} worker(s)...",
                    flush=True,
                )
                result = run(settings, workers, distinct, work, args.timeout)
                results.append(result)
                print(
                    f"  {workers} worker(s): {result['events_per_s']:,.0f} events/s "
                    f"(drain {result['drain_s']:.1f}s, wall incl. start-up {result['wall_s']:.1f}s)",
                    flush=True,
                )
        finally:
            broker.down()
    if len(results) >= 2:
        base = results[0]
        for other in results[1:]:
            print(
                f"scaling {base['workers']} -> {other['workers']} workers: "
                f"x{other['events_per_s'] / base['events_per_s']:.2f}"
            )


if __name__ == "__main__":
    main()

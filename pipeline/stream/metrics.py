"""Worker metrics, served in the Prometheus text format at /metrics on worker.web_port (0 = off)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

RECEIPTS_HEADER = "hw-receipts"  # on a keyed record: its events' receipt times, "<epoch ms>*<count>,..."
SOURCE_HEADER = "hw-source"  # on a keyed record: the source of its events
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 300)


def receipts_header(runs: list[list[int]]) -> bytes:
    """A keyed record's receipt runs ([epoch ms, events], ...) as its header value."""
    return ",".join(f"{ms}*{count}" for ms, count in runs).encode()


class FreshnessHistogram(Collector):
    """headwater_worker_freshness_seconds{source}: receipt (the raw record's received_at) -> the commit of
    the dedup transaction that wrote the event to events.canonical, one observation per event.

    prometheus_client's Histogram observes one value at a time; a keyed record carries runs of events
    received together, so this one adds a run's events to its bucket at once."""

    name = "headwater_worker_freshness_seconds"

    def __init__(self) -> None:
        self.lock = threading.Lock()  # observed on the stages' loop, collected on the web server's thread
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe_receipts(self, source: str, receipts: bytes, now_ms: int) -> None:
        total = 0.0
        with self.lock:
            counts = self.counts.get(source)
            if counts is None:
                counts = self.counts[source] = [0] * (len(FRESHNESS_BUCKETS) + 1)
                self.sums[source] = 0.0
            for run in receipts.split(b","):
                ms, _, count = run.partition(b"*")
                try:
                    seconds, events = max(now_ms - int(ms), 0) / 1000, int(count)
                except ValueError:
                    continue  # not ours to fail on: a damaged header loses its observation only
                counts[bisect.bisect_left(FRESHNESS_BUCKETS, seconds)] += events
                total += seconds * events
            self.sums[source] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            self.name,
            "Seconds from an event's receipt to the commit that wrote it to events.canonical",
            labels=["source"],
        )
        with self.lock:
            for source, counts in self.counts.items():
                cumulative, running = [], 0
                for bound, count in zip([*FRESHNESS_BUCKETS, float("inf")], counts, strict=True):
                    running += count
                    cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
                family.add_metric([source], cumulative, self.sums[source])
        yield family


class WorkerMetrics:
    """The worker's Prometheus metrics, one registry per worker."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.raw_records = Counter(
            "headwater_worker_raw_records", "Raw records consumed", ["source"], registry=self.registry
        )
        self.canonical = Counter(
            "headwater_worker_canonical_events", "Canonical events emitted", registry=self.registry
        )
        self.duplicates = Counter(
            "headwater_worker_duplicates_dropped",
            "Events dropped because their (tenant, event_id) was seen in the window",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "headwater_worker_dead_letters",
            "Dead letters by source and reason",
            ["source", "reason"],
            registry=self.registry,
        )
        self.batches_retried = Counter(
            "headwater_worker_batches_retried",
            "Batches whose outputs were not acknowledged and were processed again, per stage",
            ["stage"],
            registry=self.registry,
        )
        self.records_isolated = Counter(
            "headwater_worker_records_isolated",
            "Records that failed alone after repeated batch failures and were dead-lettered, per stage",
            ["stage"],
            registry=self.registry,
        )
        self.seconds_since_commit = Gauge(
            "headwater_worker_seconds_since_commit",
            "Seconds since the stage last committed offsets",
            ["stage"],
            registry=self.registry,
        )
        self.dedup_entries = Gauge(
            "headwater_worker_dedup_entries",
            "Entries (tenant, event_id) the dedup table of this worker holds",
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "headwater_worker_consumer_lag",
            "Records not yet consumed (high watermark - position) per topic partition",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.freshness = FreshnessHistogram()
        self.registry.register(self.freshness)

    def committed(self, headers: Iterable[tuple[str, bytes]]) -> None:
        """A keyed record's events are committed to events.canonical now: observe their freshness."""
        source = receipts = None
        for name, value in headers:
            if name == RECEIPTS_HEADER:
                receipts = value
            elif name == SOURCE_HEADER:
                source = value
        if receipts and source:
            self.freshness.observe_receipts(
                source.decode(errors="replace"), receipts, int(time.time() * 1000)
            )

    def watch(self, stage: str, seconds_since_commit: Callable[[], float]) -> None:
        """Report a stage's seconds since its last commit at every scrape."""
        self.seconds_since_commit.labels(stage).set_function(seconds_since_commit)

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics in the Prometheus text format."""
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

"""Worker metrics, served in the Prometheus text format at /metrics on worker.web_port (0 = off)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


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

    def watch(self, stage: str, seconds_since_commit: Callable[[], float]) -> None:
        """Report a stage's seconds since its last commit at every scrape."""
        self.seconds_since_commit.labels(stage).set_function(seconds_since_commit)

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics in the Prometheus text format."""
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

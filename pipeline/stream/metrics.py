"""Worker metrics, served in the Prometheus text format at /metrics on worker.web_port (0 = off)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest


class WorkerMetrics:
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
        self.consumer_lag = Gauge(
            "headwater_worker_consumer_lag",
            "Records not yet consumed (high watermark - position) per topic partition",
            ["topic", "partition"],
            registry=self.registry,
        )

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics in the Prometheus text format."""
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

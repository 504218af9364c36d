"""The receiver's Prometheus metrics (GET /metrics on the receiver's port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ReceiverMetrics:
    """Prometheus metrics of one receiver instance (its own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "headwater_receiver_requests",
            "HTTP requests by source, tenant and status",
            ["source", "tenant", "status"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "headwater_receiver_body_bytes",
            "Body bytes written to Kafka",
            ["source", "tenant"],
            registry=self.registry,
        )
        self.produce_latency = Histogram(
            "headwater_receiver_produce_seconds",
            "Time from send() to the broker's ack",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "headwater_receiver_in_flight", "Sends awaiting the broker's ack", registry=self.registry
        )

"""The dispatcher's Prometheus metrics (GET /metrics on rewards.web_port)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pipeline.rewards.records import Attempt


class RewardMetrics:
    """Prometheus metrics of one dispatcher (its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "headwater_rewards_deliveries",
            "Rewards by tenant and outcome: delivered, dead_lettered, "
            "duplicate (already pending or delivered: not sent again), invalid (intake dead letter)",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "headwater_rewards_attempts",
            "Attempts by tenant and result: 2xx, 3xx, 4xx, 429, 5xx, timeout, "
            "connection_error, circuit_open, no_webhook",
            ["tenant", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "headwater_rewards_attempt_seconds",
            "Webhook request latency",
            ["tenant"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queue_depth = Gauge(
            "headwater_rewards_retry_queue_depth",
            "Pending rewards: waiting for a retry, for a slot, or in flight",
            ["tenant"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "headwater_rewards_in_flight", "Webhook requests in flight", ["tenant"], registry=self.registry
        )
        self.breaker_open = Gauge(
            "headwater_rewards_breaker_open",
            "1 while the tenant's breaker is not closed",
            ["tenant"],
            registry=self.registry,
        )
        self.errors = Counter(
            "headwater_rewards_stage_errors",
            "Records a dispatcher stage could not read (logged); should stay at 0",
            ["stage"],
            registry=self.registry,
        )
        self.batches_retried = Counter(
            "headwater_rewards_batches_retried",
            "Batches whose outputs were not acknowledged and were processed again, per stage",
            ["stage"],
            registry=self.registry,
        )
        self.records_isolated = Counter(
            "headwater_rewards_records_isolated",
            "Records that failed alone after repeated batch failures, per stage",
            ["stage"],
            registry=self.registry,
        )
        self.seconds_since_commit = Gauge(
            "headwater_rewards_seconds_since_commit",
            "Seconds since the stage last committed offsets",
            ["stage"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "headwater_rewards_consumer_lag",
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


def attempt_result(attempt: Attempt) -> str:
    if attempt.status is not None:
        return "429" if attempt.status == 429 else f"{attempt.status // 100}xx"
    error = attempt.error or ""
    if error.startswith("circuit open"):
        return "circuit_open"
    if error.startswith("no rewards_webhook"):
        return "no_webhook"
    return "timeout" if error.startswith("timeout") else "connection_error"

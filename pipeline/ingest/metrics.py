"""The receiver's Prometheus metrics (GET /metrics on the receiver's port).

With `--processes N` every process writes its values to prometheus_client's multiprocess directory and
/metrics, on any process, answers the sum over all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector


class ReceiverMetrics:
    """Prometheus metrics of one receiver instance (its own registry, so tests can run several)."""

    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
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
        self.refusals = Counter(
            "headwater_receiver_refusals",
            "Requests refused before a write, by tenant and reason (over_share: 429, in_flight_bound: 503)",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.produce_latency = Histogram(
            "headwater_receiver_produce_seconds",
            "Time from a record batch's first record to the broker's ack (one observation per batch)",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "headwater_receiver_in_flight",
            "Requests holding an in-flight slot (body being read or awaiting the ack)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._read_in_flight: Callable[[], float] = lambda: 0.0
        self._answered: dict[tuple[str, str, int], _Answered] = {}

    def request(self, source: str, tenant: str, status: int, nbytes: int = 0) -> None:
        """Count one answered request: added up in plain integers and handed to the Prometheus counters
        when /metrics is rendered (exact at every scrape; two locked counter updates a request were
        ~2 us of the handler). With --processes N the scrape reads other processes' files, so there
        every request is handed over at once."""
        key = (source, tenant, status)
        answered = self._answered.get(key)
        if answered is None:
            answered = self._answered[key] = _Answered(
                self.requests.labels(source, tenant, str(status)), lambda: self.bytes.labels(source, tenant)
            )
        answered.requests += 1
        answered.nbytes += nbytes
        if self.multiprocess:
            answered.hand_over()

    def _hand_over(self) -> None:
        for answered in self._answered.values():
            answered.hand_over()

    def track_in_flight(self, read: Callable[[], float]) -> None:
        """The in-flight gauge reads the admission count when scraped, instead of two locked updates per
        request; with --processes N the value is written to the shared files by `refresh_in_flight`."""
        self._read_in_flight = read
        if not self.multiprocess:
            self.in_flight.set_function(read)

    def refresh_in_flight(self) -> None:
        self.in_flight.set(self._read_in_flight())

    def refused(self, tenant: str, reason: str) -> None:
        self.refusals.labels(tenant, reason).inc()

    def observe_ack(self, source: str, seconds: float) -> None:
        self.produce_latency.labels(source).observe(seconds)

    def render(self) -> bytes:
        """The text exposition: this process's registry, or the sum over every receiver process."""
        self._hand_over()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


class _Answered:
    """Requests and body bytes of one (source, tenant, status) not yet added to their counters."""

    __slots__ = ("byte_counter", "counter", "nbytes", "requests")

    def __init__(self, counter: Counter, byte_counter: Callable[[], Counter]) -> None:
        self.counter = counter
        self.byte_counter = byte_counter  # the child is made once there are bytes (none for a refusal)
        self.requests = 0
        self.nbytes = 0

    def hand_over(self) -> None:
        if self.requests:
            self.counter.inc(self.requests)
            self.requests = 0
        if self.nbytes:
            self.byte_counter().inc(self.nbytes)
            self.nbytes = 0

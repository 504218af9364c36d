"""headwater_worker_freshness_seconds: receipt -> canonical commit per source, one observation per event."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.stream.metrics import RECEIPTS_HEADER, SOURCE_HEADER, WorkerMetrics, receipts_header


def samples(metrics: WorkerMetrics) -> dict[tuple[str, str, str], float]:
    """(sample name, source, le) -> value of the freshness histogram as /metrics shows it."""
    text = generate_latest(metrics.registry).decode()
    [family] = [
        f for f in text_string_to_metric_families(text) if f.name == "headwater_worker_freshness_seconds"
    ]
    return {(s.name, s.labels["source"], s.labels.get("le", "")): s.value for s in family.samples}


def test_each_event_of_a_committed_keyed_record_is_observed_with_its_own_receipt() -> None:
    """A keyed record's runs (3 events received 40 ms before the commit, 1 event 2 s before) count as
    four observations in their buckets; a record without receipts (a replay's) is not observed."""
    metrics = WorkerMetrics()
    now_ms = 1_700_000_000_000
    runs = receipts_header([[now_ms - 40, 3], [now_ms - 2000, 1]])
    metrics.freshness.observe_receipts("segment", runs, now_ms)
    metrics.committed([("hw-replay-id", b"r1")])
    seen = samples(metrics)
    assert seen[("headwater_worker_freshness_seconds_bucket", "segment", "0.05")] == 3
    assert seen[("headwater_worker_freshness_seconds_bucket", "segment", "1.0")] == 3
    assert seen[("headwater_worker_freshness_seconds_bucket", "segment", "2.0")] == 4
    assert seen[("headwater_worker_freshness_seconds_count", "segment", "")] == 4
    assert abs(seen[("headwater_worker_freshness_seconds_sum", "segment", "")] - 2.12) < 1e-9


def test_committed_reads_the_source_and_receipts_from_the_keyed_headers() -> None:
    """The dedup stage hands over the keyed record's headers; a damaged run is skipped, not raised."""
    metrics = WorkerMetrics()
    metrics.committed([(SOURCE_HEADER, b"usermaven"), (RECEIPTS_HEADER, b"17*x,1*2")])
    assert samples(metrics)[("headwater_worker_freshness_seconds_count", "usermaven", "")] == 2

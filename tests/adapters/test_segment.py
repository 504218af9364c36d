"""Segment rules a vector cannot state: batches of Segment's maximum size (docs/sources.md §4.2)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from adapters import segment
from pipeline.adapting import Reject
from pipeline.records import RawHeaders

META = RawHeaders(
    tenant="demo", source="segment", received_at=datetime(2024, 3, 1, 12, tzinfo=UTC), request_id="r1"
)


def test_a_full_batch_keeps_order_and_isolates_bad_elements() -> None:
    """A 4000-element batch gives 4000 outcomes in order; every 100th bad element fails alone (§1, §4.2)."""
    messages = [
        {"type": "track", "event": "E", "messageId": f"m{i}", "userId": None if i % 100 == 0 else f"u{i}",
         "timestamp": "2024-03-01T12:00:00Z"}
        for i in range(4000)
    ]  # fmt: skip
    outcomes: list[str] = []
    for record in segment.parse(orjson.dumps(messages), META):
        try:
            outcomes.append(segment.normalize(record, META).vendor_event_id or "")
        except Reject as verdict:
            outcomes.append(verdict.reason.code)
    assert len(outcomes) == 4000
    assert outcomes[::100] == ["missing_user_identity"] * 40
    assert outcomes[1:100] == [f"m{i}" for i in range(1, 100)]

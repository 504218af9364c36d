"""Usermaven rules a vector cannot state: fingerprints of SDK payloads (docs/sources.md §3.5, §4.7, §6.11)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from adapters import usermaven
from pipeline.fingerprint import fingerprint
from pipeline.records import RawHeaders

# The Python SDK's shape: always an array, event_id "", no _timestamp, integer user id.
SDK_BODY = [
    {"api_key": "ak_demo", "event_id": "", "event_type": "signed_up", "user": {"id": 42}, "src": "http"}
]


def derived_ids(body: Any, received_at: datetime) -> list[str]:
    raw_meta = RawHeaders(
        tenant="demo",
        source="usermaven",
        received_at=received_at,
        request_id="r1",
        vendor={"api_key": "ak_demo"},
    )
    out = []
    for record in usermaven.parse(orjson.dumps(body), raw_meta):
        draft = usermaven.normalize(record, raw_meta)
        assert draft.vendor_event_id is None and draft.timestamp is None
        out.append(
            fingerprint(
                tenant="demo",
                source=usermaven.SOURCE,
                event_name=draft.event_name,
                user_id=draft.user_id,
                anonymous_id=draft.anonymous_id,
                timestamp=draft.timestamp,
                properties=draft.properties,
                extra=draft.fingerprint_extra,
            )
        )
    return out


def test_sdk_retries_collapse_without_a_time_or_id() -> None:
    """event_id "" and no _timestamp: a retry received later fingerprints identically (§3.5, §6.11)."""
    first = derived_ids(SDK_BODY, datetime(2024, 3, 1, 12, tzinfo=UTC))
    retry = derived_ids(SDK_BODY, datetime(2024, 3, 1, 12, 1, tzinfo=UTC))
    assert first == retry
    assert first[0].startswith("fp_")

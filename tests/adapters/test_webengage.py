"""WebEngage rules a vector cannot state: the fingerprint without x-request-id (docs/sources.md §3.5,
§4.6)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from adapters import webengage
from pipeline.fingerprint import fingerprint
from pipeline.records import RawHeaders

BODY = {
    "event_data": {"result": "SUCCESS"},
    "event_time": "2024-03-01T12:00:00+0000",
    "event_name": "push_notification_accepted",
    "user_id": "a@example.com",
}


def derived_id(tenant: str, license_code: str, received_at: datetime) -> str:
    """The id the core derives when the request carried no x-request-id."""
    raw_meta = RawHeaders(
        tenant=tenant,
        source="webengage",
        received_at=received_at,
        request_id="r1",
        vendor={"license_code": license_code},
    )
    (record,) = webengage.parse(orjson.dumps(BODY), raw_meta)
    draft = webengage.normalize(record, raw_meta)
    assert draft.vendor_event_id is None
    return fingerprint(
        tenant=tenant,
        source=webengage.SOURCE,
        event_name=draft.event_name,
        user_id=draft.user_id,
        anonymous_id=draft.anonymous_id,
        timestamp=draft.timestamp,
        properties=draft.properties,
        extra=draft.fingerprint_extra,
    )


def test_retries_collapse_and_license_codes_separate() -> None:
    """A retry fingerprints identically; the same body under another license code does not (§3.5)."""
    first = derived_id("demo", "~demo5678", datetime(2024, 3, 1, 12, tzinfo=UTC))
    retry = derived_id("demo", "~demo5678", datetime(2024, 3, 1, 12, 5, tzinfo=UTC))
    other_license = derived_id("demo", "~demo9999", datetime(2024, 3, 1, 12, tzinfo=UTC))
    assert first == retry != other_license

"""CleverTap rules a vector cannot state: how the fingerprint separates campaigns (docs/sources.md §3.5,
§6.7)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from adapters import clevertap
from pipeline.adapting import Draft
from pipeline.fingerprint import fingerprint
from pipeline.records import RawHeaders


def meta(received_at: datetime = datetime(2024, 3, 1, 12, tzinfo=UTC)) -> RawHeaders:
    return RawHeaders(tenant="demo", source="clevertap", received_at=received_at, request_id="r1")


def ids(body: dict[str, Any], raw_meta: RawHeaders) -> list[str]:
    """The event ids the core would derive for each profile of `body`."""
    drafts = [
        clevertap.normalize(record, raw_meta) for record in clevertap.parse(orjson.dumps(body), raw_meta)
    ]
    return [derive(draft, raw_meta) for draft in drafts]


def derive(draft: Draft, raw_meta: RawHeaders) -> str:
    assert draft.vendor_event_id is None
    return fingerprint(
        tenant=raw_meta.tenant,
        source=clevertap.SOURCE,
        event_name=draft.event_name,
        user_id=draft.user_id,
        anonymous_id=draft.anonymous_id,
        timestamp=draft.timestamp,
        properties=draft.properties,
        extra=draft.fingerprint_extra,
    )


def campaign(target_id: int) -> dict[str, Any]:
    return {
        "targetId": target_id,
        "key_values": {"event_name": "Trial Started"},
        "profiles": [{"identity": "u_1"}, {"identity": "u_2"}],
    }


def test_a_retried_request_fingerprints_identically() -> None:
    """CleverTap retries once; with no event_id or timestamp key-value the retry still collapses (§4.5)."""
    later = meta(datetime(2024, 3, 1, 12, 0, 3, tzinfo=UTC))
    assert ids(campaign(17), meta()) == ids(campaign(17), later)


def test_profiles_and_campaigns_get_distinct_fingerprints() -> None:
    """Two users in one campaign, or one user in two campaigns, are different events (§3.5 extra)."""
    first, second = ids(campaign(17), meta())
    other_campaign = ids(campaign(18), meta())
    assert len({first, second, *other_campaign}) == 4

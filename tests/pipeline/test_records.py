"""The canonical event's JSON is exactly pydantic's JSON dump, in declaration order (architecture.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from pipeline.records import CanonicalEvent, format_utc

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(
    properties=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    offset_minutes=st.integers(-12 * 60, 14 * 60),
    micro=st.integers(0, 999_999),
    anonymous=st.none() | st.text(min_size=1, max_size=5),
)
def test_to_json_equals_the_pydantic_dump(
    properties: dict[str, object], offset_minutes: int, micro: int, anonymous: str | None
) -> None:
    zone = timezone(timedelta(minutes=offset_minutes))
    event = CanonicalEvent.model_validate({
        "event_id": "e1", "event_id_derived": False, "event_name": "Signed Up ✓", "tenant": "acme",
        "source": "segment", "user_id": "u1", "anonymous_id": anonymous,
        "timestamp": datetime(2024, 3, 1, 12, 0, 0, micro, tzinfo=zone),
        "received_at": datetime(2024, 3, 1, 12, 0, 1, tzinfo=UTC),
        "properties": properties, "user_traits": {"plan": "pro"}, "context": {"vendor": {"extra": {}}},
    })
    assert event.to_json() == orjson.dumps(event.model_dump(mode="json"))


def test_timestamps_are_utc_with_microseconds() -> None:
    plus_five_thirty = timezone(timedelta(hours=5, minutes=30))
    assert format_utc(datetime(2024, 3, 1, 17, 30, tzinfo=plus_five_thirty)) == "2024-03-01T12:00:00.000000+00:00"

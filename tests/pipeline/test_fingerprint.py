"""The deterministic event id of docs/sources.md §3.5."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from pipeline.fingerprint import fingerprint, format_timestamp

CHECK = {
    "tenant": "demo",
    "source": "usermaven",
    "event_name": "signed_up",
    "user_id": "u_1",
    "anonymous_id": None,
    "timestamp": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    "properties": {"plan": "free", "seats": 3},
    "extra": None,
}


def fp(**changes: Any) -> str:
    return fingerprint(**{**CHECK, **changes})


def test_check_value() -> None:
    """The §3.5 worked example gives the published check value."""
    assert fp() == "fp_0be7da2f8a7e8a45d16b1b90924da9401f9607a139860c148f3479507ad4e555"


def test_key_order_and_whitespace_of_the_input_do_not_matter() -> None:
    """Properties decoded from differently ordered and spaced JSON give the same id (§3.5)."""
    compact = orjson.loads(b'{"plan":"free","seats":3,"nested":{"a":1,"b":[1,2]}}')
    spaced = orjson.loads(b'{ "nested" : { "b" : [ 1, 2 ], "a" : 1 },\n  "seats": 3, "plan": "free" }')
    assert fp(properties=compact) == fp(properties=spaced)


def test_same_instant_in_another_zone_is_the_same_id() -> None:
    """The time is formatted in UTC, so the input's offset does not matter (§3.5)."""
    shifted = datetime(2024, 1, 2, 8, 34, 5, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert fp(timestamp=shifted) == fp()


def test_every_material_field_changes_the_id() -> None:
    """Each field of the material takes part in the hash, and None differs from a value (§3.5)."""
    variants = [
        fp(tenant="other"),
        fp(source="segment"),
        fp(event_name="signed_in"),
        fp(user_id=None, anonymous_id="u_1"),
        fp(timestamp=None),
        fp(timestamp=datetime(2024, 1, 2, 3, 4, 5, 1, tzinfo=UTC)),
        fp(properties={"plan": "free", "seats": 4}),
        fp(extra={"targetId": 17}),
        fp(extra={"targetId": 18}),
    ]
    assert len({fp(), *variants}) == len(variants) + 1


def test_unicode_is_hashed_as_utf8() -> None:
    """Non-ASCII text is hashed as raw UTF-8 (ensure_ascii=False), stably (§3.5)."""
    assert fp(properties={"name": "Zoë"}) == fp(properties=orjson.loads('{"name":"Zoë"}'.encode()))
    assert fp(properties={"name": "Zoë"}) != fp(properties={"name": "Zoe"})


def test_timestamp_spelling() -> None:
    """Times are spelled %Y-%m-%dT%H:%M:%S.%fZ in UTC, years zero-padded on every platform (§3.5)."""
    assert format_timestamp(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2024-01-02T03:04:05.000000Z"
    assert format_timestamp(datetime(5, 1, 1, tzinfo=UTC)) == "0005-01-01T00:00:00.000000Z"


def test_id_shape() -> None:
    """Ids are fp_ plus 64 hex digits: within the 256-character limit of §2."""
    value = fp()
    assert value.startswith("fp_") and len(value) == 67 and int(value[3:], 16) >= 0

"""Records that cross topics: the canonical event's JSON is pydantic's dump; dead letters round-trip
exactly."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

import orjson
from aiokafka import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from pipeline import reasons
from pipeline.records import (
    CanonicalEvent,
    DeadLetter,
    KeyedBatch,
    Origin,
    RawHeaders,
    RawRecord,
    UtcClock,
    format_utc,
    new_request_id,
)
from pipeline.stream.normalize_batch import raw_record
from pipeline.stream.record_outcomes import dead_letter

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
    event = CanonicalEvent.model_validate(
        {
            "event_id": "e1",
            "event_id_derived": False,
            "event_name": "Signed Up ✓",
            "tenant": "acme",
            "source": "segment",
            "user_id": "u1",
            "anonymous_id": anonymous,
            "timestamp": datetime(2024, 3, 1, 12, 0, 0, micro, tzinfo=zone),
            "received_at": datetime(2024, 3, 1, 12, 0, 1, tzinfo=UTC),
            "properties": properties,
            "user_traits": {"plan": "pro"},
            "context": {"vendor": {"extra": {}}},
        }
    )
    assert event.to_json() == orjson.dumps(event.model_dump(mode="json"))


def test_timestamps_are_utc_with_microseconds() -> None:
    plus_five_thirty = timezone(timedelta(hours=5, minutes=30))
    assert (
        format_utc(datetime(2024, 3, 1, 17, 30, tzinfo=plus_five_thirty))
        == "2024-03-01T12:00:00.000000+00:00"
    )


@given(
    body=st.binary(max_size=512),
    index=st.none() | st.integers(0, 10_000),
    element=json_values,
    redrive_count=st.integers(0, 50),
)
def test_a_dead_letter_survives_its_json_round_trip(
    body: bytes, index: int | None, element: object, redrive_count: int
) -> None:
    """DeadLetter -> JSON -> DeadLetter is the identity, and the original bytes come back exactly
    (snowplow-badrows' "bad rows must roundtrip via byte array")."""
    headers = RawHeaders(
        tenant="acme",
        source="segment",
        received_at=datetime(2024, 3, 1, tzinfo=UTC),
        request_id="r1",
        redrive_count=redrive_count,
        vendor={"request_id": "x"},
    )
    raw = RawRecord(body=body, headers=headers, origin=Origin(topic="raw.segment", partition=2, offset=9))
    letter = dead_letter(
        raw,
        "normalize",
        reasons.WRONG_TYPE.about("user_id"),
        "user_id must be a string",
        element=element,
        index=index,
    )
    again = DeadLetter.from_json(letter.to_json())
    assert again == letter
    assert again.body == body
    assert again.raw_headers() == headers


# The receiver's per-request stamps: a ULID request id and the receive time.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid_value(ulid: str) -> int:
    value = 0
    for char in ulid:
        value = value * 32 + _CROCKFORD.index(char)
    return value


@given(now_ns=st.integers(0, 2**48 * 1_000_000 - 1))
def test_a_request_id_is_a_ulid_of_its_millisecond(now_ns: int) -> None:
    request_id = new_request_id(now_ns)
    assert len(request_id) == 26 and set(request_id) <= set(_CROCKFORD)
    assert _ulid_value(request_id) >> 80 == now_ns // 1_000_000  # 48-bit time, then 80 random bits


def test_request_ids_sort_by_time_and_do_not_repeat() -> None:
    ids = [new_request_id(ms * 1_000_000) for ms in (1, 2, 2, 10**12)]
    assert ids[0] < ids[1] and ids[2] < ids[3] and ids[1] != ids[2]
    assert len({new_request_id() for _ in range(10_000)}) == 10_000


def test_a_forked_child_does_not_repeat_the_request_ids_of_its_parent() -> None:
    """The random bytes are read ahead in a pool; a fork must not leave the child a copy of it."""
    new_request_id()  # the pool now holds bytes for the next ids
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os.write(write_end, "".join(new_request_id(0) for _ in range(20)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(child, 0)
    in_child = {text[i : i + 26] for i in range(0, len(text), 26)}
    in_parent = {new_request_id(0) for _ in range(20)}
    assert len(in_child) == 20 and not in_child & in_parent


@given(
    seconds=st.integers(0, 4_102_444_800), micros=st.lists(st.integers(0, 999_999), min_size=1, max_size=4)
)
def test_the_receivers_clock_writes_what_format_utc_writes(seconds: int, micros: list[int]) -> None:
    clock = UtcClock()
    for micro in micros:  # several stamps within one cached second
        now_ns = (seconds * 1_000_000 + micro) * 1000 + 999
        expected = format_utc(datetime.fromtimestamp(seconds, UTC).replace(microsecond=micro))
        assert clock.text(now_ns) == expected.encode()


utc_offsets = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-1439, 1439))
aware_times = st.datetimes(
    # hypothesis takes naive bounds and attaches the zones itself
    min_value=datetime(1, 1, 2),  # noqa: DTZ001
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC) | utc_offsets,
)


@given(aware_times)
def test_format_utc_writes_isoformat_of_the_utc_instant_with_microseconds(moment: datetime) -> None:
    """format_utc (written by orjson) is exactly isoformat(timespec="microseconds") of the instant in UTC,
    zero fractions and years below 1000 included."""
    assert format_utc(moment) == moment.astimezone(UTC).isoformat(timespec="microseconds")


@given(timestamp=aware_times, received_at=aware_times)
def test_to_json_writes_both_times_as_format_utc(timestamp: datetime, received_at: datetime) -> None:
    """Whether to_json hands orjson the datetime or format_utc's text, the JSON says format_utc's text."""
    event = CanonicalEvent.model_validate(
        {
            "event_id": "e1",
            "event_id_derived": False,
            "event_name": "n",
            "tenant": "acme",
            "source": "segment",
            "user_id": "u1",
            "anonymous_id": None,
            "timestamp": timestamp,
            "received_at": received_at,
            "properties": {},
            "user_traits": {},
            "context": {},
        }
    )
    doc = orjson.loads(event.to_json())
    assert doc["timestamp"] == timestamp.astimezone(UTC).isoformat(timespec="microseconds")
    assert doc["received_at"] == received_at.astimezone(UTC).isoformat(timespec="microseconds")
    assert event.to_json() == orjson.dumps(event.model_dump(mode="json"))


@given(aware_times)
def test_raw_headers_hold_received_at_in_utc_as_the_same_instant(moment: datetime) -> None:
    """received_at read from any offset is the same instant, held in UTC; its header text is unchanged."""
    headers = RawHeaders(tenant="acme", source="segment", received_at=moment, request_id="r1")
    again = RawHeaders.from_kafka(
        [
            ("hw-tenant", b"acme"),
            ("hw-source", b"segment"),
            ("hw-request-id", b"r1"),
            ("hw-received-at", moment.isoformat().encode()),
        ]
    )
    for held in (headers.received_at, again.received_at):
        assert held.tzinfo is UTC
        assert held == moment
    assert dict(headers.to_kafka())["hw-received-at"] == format_utc(moment).encode()


def _event(event_id: str, user_id: str) -> CanonicalEvent:
    return CanonicalEvent.model_validate(
        {
            "event_id": event_id,
            "event_id_derived": False,
            "event_name": "n",
            "tenant": "acme",
            "source": "segment",
            "user_id": user_id,
            "anonymous_id": None,
            "timestamp": datetime(2024, 3, 1, tzinfo=UTC),
            "received_at": datetime(2024, 3, 1, tzinfo=UTC),
            "properties": {"text": event_id},
            "user_traits": {},
            "context": {},
        }
    )


@given(
    ids=st.lists(st.tuples(st.text(min_size=1, max_size=12), st.text(max_size=8)), min_size=1, max_size=20)
)
def test_a_keyed_pack_gives_back_each_events_keys_and_exact_json_in_order(ids: list[tuple[str, str]]) -> None:
    """Ids and user ids may hold tabs, newlines and any character: each event's keys and JSON come back."""
    events = [_event(event_id, user_id) for event_id, user_id in ids]
    pack = KeyedBatch()
    for event in events:
        pack.add(event)
    assert KeyedBatch.entries(pack.to_bytes()) == [
        (e.dedup_key().encode(), e.kafka_key().encode(), e.to_json()) for e in events
    ]


def test_a_keyed_pack_of_an_earlier_release_is_still_read() -> None:
    """Packs written before the key header (one [dedup_key, canonical_key] TAB event line per event) may
    still sit on the keyed topic when a worker is upgraded."""
    events = [_event("e1", "u1"), _event("e\t2", "u\n2")]
    earlier = b"\n".join(orjson.dumps([e.dedup_key(), e.kafka_key()]) + b"\t" + e.to_json() for e in events)
    assert KeyedBatch.entries(earlier) == [
        (e.dedup_key().encode(), e.kafka_key().encode(), e.to_json()) for e in events
    ]


def test_a_consumed_record_knows_where_it_sits_when_its_dead_letter_asks() -> None:
    """raw_record does not build an Origin per record; the dead letter of one still names its Kafka
    coordinates and time, exactly as a record built with its Origin would."""
    headers = RawHeaders(
        tenant="acme", source="segment", received_at=datetime(2024, 3, 1, tzinfo=UTC), request_id="r1"
    )
    message = ConsumerRecord(
        "raw.segment", 4, 1234, 1_709_294_400_000, 0, None, b"{", None, -1, 1, tuple(headers.to_kafka())
    )
    raw = raw_record(message)
    located = Origin(topic="raw.segment", partition=4, offset=1234, timestamp_ms=1_709_294_400_000)
    assert raw.origin == located
    assert raw.origin is raw.origin  # built once
    built = RawRecord(body=b"{", headers=headers, origin=located)
    letter = dead_letter(raw, "parse", reasons.INVALID_JSON, "body is not valid JSON")
    assert letter == dead_letter(built, "parse", reasons.INVALID_JSON, "body is not valid JSON").model_copy(
        update={"failed_at": letter.failed_at}
    )
    assert RawRecord(body=b"", headers=headers).origin is None

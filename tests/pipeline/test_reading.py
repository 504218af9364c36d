"""The shared field readers: identifiers, names, containers and the §3.4 timestamp rules (docs/sources.md
§3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import reading as read
from pipeline.adapting import Reject


def verdict(call: Any, *args: Any, **kwargs: Any) -> Reject:
    with pytest.raises(Reject) as caught:
        call(*args, **kwargs)
    return caught.value


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# --- §3.4 timestamps ---------------------------------------------------------------------------------

MUST_WORK = [
    # the spec's own examples
    ("2024-01-05T10:00:00Z", utc(2024, 1, 5, 10)),
    ("2024-01-05T10:00:00.123456789+05:30", utc(2024, 1, 5, 4, 30, 0, 123456)),
    ("2016-06-01T15:53:59+0000", utc(2016, 6, 1, 15, 53, 59)),
    ("2022-02-28 20:07:01.795", utc(2022, 2, 28, 20, 7, 1, 795000)),
    ("2020-11-24 09:59:55.977000", utc(2020, 11, 24, 9, 59, 55, 977000)),
    ("2024-01-05 10:00:00", utc(2024, 1, 5, 10)),
    # zone forms, minutes-only times, long fractions truncated (never rounded up)
    ("2024-01-05T10:00:00-05", utc(2024, 1, 5, 15)),
    ("2024-01-05T10:00:00+01:00", utc(2024, 1, 5, 9)),
    ("2024-01-05T10:00", utc(2024, 1, 5, 10)),
    ("2024-01-05T10:00+0530", utc(2024, 1, 5, 4, 30)),
    ("2024-01-05T10:00:00.9999999Z", utc(2024, 1, 5, 10, 0, 0, 999999)),
    ("2024-01-05T10:00:00.1Z", utc(2024, 1, 5, 10, 0, 0, 100000)),
    # rule 1: epoch numbers, unit by magnitude
    (1709294400, utc(2024, 3, 1, 12)),
    (1709294400000, utc(2024, 3, 1, 12)),
    (1709294400000000, utc(2024, 3, 1, 12)),
    (1709294400.5, utc(2024, 3, 1, 12, 0, 0, 500000)),
    (1709294400123.456, utc(2024, 3, 1, 12, 0, 0, 123456)),
    (0, utc(1970, 1, 1)),  # no range checks (§6.13)
    (-86400, utc(1969, 12, 31)),
    (99999999999, EPOCH + timedelta(seconds=99999999999)),  # the largest seconds value
    (100000000000, utc(1973, 3, 3, 9, 46, 40)),  # 1e11 is already milliseconds
    # rule 2: digit strings
    ("1709294400000", utc(2024, 3, 1, 12)),
    ("1709294400", utc(2024, 3, 1, 12)),
    ("1709294400.25", utc(2024, 3, 1, 12, 0, 0, 250000)),
    # rule 3: CleverTap dates
    ("$D_1709294400", utc(2024, 3, 1, 12)),
    ("$D_1709294400000", utc(2024, 3, 1, 12)),
]

MUST_FAIL = [
    # the spec's own examples
    "14/05/2024 3:22 PM",
    "Tue, 14 May 2024 09:51:00 GMT",
    "Fri Mar 01 2024 12:00:00 GMT+0000 (Coordinated Universal Time)",
    "28.02.2022, 20:07",
    "2024-01-05",
    True,
    False,
    {"seconds": 1709294400},
    # forms fromisoformat would take but rule 4 does not
    "2024-01-05T10",
    "2021-W01-1T10:00:00",
    "20240105T101010",
    # near misses of rule 4
    "2024-01-05  10:00:00",  # two spaces
    "2024-01-05t10:00:00",
    "2024-01-05T10:00:00z",
    "2024-01-05T10:00:00 Z",
    "2024-01-05T10:00.5",  # a fraction needs seconds
    "2024-01-05T10:00:00,5",
    "2024-01-05T10:00:00+5",
    "2024-01-05T10:00:00+05:3",
    "2024-01-05T10:00:00 +05:00",
    "2024-13-05T10:00:00",  # the regex passes, fromisoformat refuses
    "2024-02-30T10:00:00",
    "2024-01-05T24:00:00",
    "2024-01-05T10:00:60",
    "2024-01-05T10:00:00+24:00",
    "9999-12-31T23:59:59-05:00",  # past year 9999 in UTC
    "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
    " 2024-01-05T10:00:00Z",
    "-1709294400",
    "1709294400.",
    ".5",
    "1e9",
    "١٧٠٩٢٩٤٤٠٠",  # Arabic-Indic digits are not [0-9]
    "$D_",
    "$D_abc",
    "$d_1709294400",
    1e17,
    -1e17,
    10**17,
    -99999999999,  # before year 1
    [1709294400],
]


@pytest.mark.parametrize(("value", "expected"), MUST_WORK, ids=repr)
def test_supported_time_forms_parse_to_utc(value: Any, expected: datetime) -> None:
    """Epoch numbers, digit strings, $D_ dates and rule-4 ISO strings parse to aware UTC (§3.4)."""
    parsed = read.timestamp({"t": value}, "t", required=True)
    assert parsed == expected
    assert parsed is not None and parsed.tzinfo is UTC


@pytest.mark.parametrize("value", MUST_FAIL, ids=repr)
def test_other_time_forms_are_invalid_timestamp(value: Any) -> None:
    """Everything outside rules 1–4 is invalid_timestamp, with the field as path (§3.4 rule 5)."""
    rejected = verdict(read.timestamp, {"t": value}, "t", required=False)
    assert (rejected.reason.code, rejected.path) == ("invalid_timestamp", "t")


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n"], ids=repr)
def test_null_and_blank_times_are_missing(value: Any) -> None:
    """Null and blank strings are missing: None when optional, missing_timestamp when required (§3.4)."""
    assert read.timestamp({"t": value}, "t", required=False) is None
    assert verdict(read.timestamp, {"t": value}, "t", required=True).reason.code == "missing_timestamp"


def test_absent_time_is_missing() -> None:
    """An absent field is missing, and all candidates missing is missing_timestamp when required (§3.4)."""
    assert read.timestamp({}, "a", "b", required=False) is None
    assert verdict(read.timestamp, {}, "a", "b", required=True).reason.code == "missing_timestamp"


def test_first_non_missing_field_wins() -> None:
    """Missing candidates are skipped; the first present one is used (§3.4)."""
    record = {"a": None, "b": " ", "c": "2024-01-05T10:00:00Z", "d": 0}
    assert read.timestamp(record, "a", "b", "c", "d", required=True) == utc(2024, 1, 5, 10)


def test_invalid_first_field_never_falls_through() -> None:
    """An invalid first present field is dead-lettered even when a later one is valid (§3.4)."""
    record = {"a": "yesterday", "b": "2024-01-05T10:00:00Z"}
    assert verdict(read.timestamp, record, "a", "b", required=True).path == "a"


def test_non_utc_offsets_are_converted() -> None:
    """The result is in UTC whatever the offset of the input (§2)."""
    parsed = read.timestamp({"t": "2024-01-05T00:30:00+01:00"}, "t", required=True)
    assert parsed == datetime(2024, 1, 5, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert parsed is not None and parsed.utcoffset() == timedelta(0) and parsed.day == 4


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(10**8, 6 * 10**10), micros=st.integers(0, 999_999), negative=st.booleans())
def test_epoch_in_seconds_ms_and_us_is_the_same_instant(seconds: int, micros: int, negative: bool) -> None:
    """One instant in s, ms or µs, as numbers or digit strings, parses to the same time (§3.4 rules 1–2)."""

    def parse(value: Any) -> datetime | None:
        return read.timestamp({"t": value}, "t", required=True)

    whole = -seconds if negative else seconds
    assert parse(whole) == parse(whole * 1000) == parse(whole * 10**6) == EPOCH + timedelta(seconds=whole)
    if not negative:  # digit strings carry no sign
        total_us = seconds * 10**6 + micros
        as_s, as_ms = f"{seconds}.{micros:06d}", f"{total_us // 1000}.{total_us % 1000:03d}"
        assert parse(as_s) == parse(as_ms) == parse(total_us) == EPOCH + timedelta(microseconds=total_us)


# --- §3.1 identifiers, §3.2 names, §3.3 containers --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("u_1", "u_1"), ("  u_1\n", "u_1"), ("", None), ("   ", None), (None, None),
     (884213, "884213"), (-7, "-7"), ("Zoë", "Zoë")],
    ids=repr,
)  # fmt: skip
def test_identifiers_are_trimmed_strings_or_integers(value: Any, expected: str | None) -> None:
    """Strings are trimmed (blank is absent), integers become decimal strings, null is absent (§3.1)."""
    assert read.identifier({"id": value}, "id") == expected


@pytest.mark.parametrize("value", [1.0, 1.5, True, False, {"id": 1}, [1], ["u"]], ids=repr)
def test_other_identifier_types_are_wrong_type(value: Any) -> None:
    """Floats, booleans, objects and arrays are wrong_type:<field>, never coerced (§3.1)."""
    rejected = verdict(read.identifier, {"id": value}, "id")
    assert (rejected.reason.code, rejected.path) == ("wrong_type:id", "id")


def test_dotted_fields_reach_into_objects() -> None:
    """user.id reads a nested field; an absent or null parent means absent (§4.7)."""
    assert read.identifier({"user": {"id": 5}}, "user.id") == "5"
    assert read.identifier({"user": None}, "user.id") is None
    assert read.identifier({}, "user.id") is None


def test_a_parent_that_is_not_an_object_is_wrong_type() -> None:
    """A scalar where an object should be is wrong_type:<parent>, not silently absent (§3.3)."""
    rejected = verdict(read.identifier, {"user": "u_9"}, "user.id")
    assert (rejected.reason.code, rejected.path) == ("wrong_type:user", "user")


def test_event_id_takes_the_first_present_spelling() -> None:
    """Blank ids fall through to the next spelling; None means the core fingerprints (§3.1, §4.7)."""
    assert read.event_id({"a": "", "b": {"c": " x "}}, "a", "b.c") == "x"
    assert read.event_id({"a": ""}, "a", "b") is None


def test_event_id_over_256_characters_is_invalid() -> None:
    """Vendor ids are 1–256 characters; longer is invalid_event_id (§2)."""
    assert read.event_id({"id": "x" * 256}, "id") == "x" * 256
    assert verdict(read.event_id, {"id": "x" * 257}, "id").reason.code == "invalid_event_id"


def test_event_name_is_a_non_blank_string_kept_verbatim() -> None:
    """A name must be a non-blank JSON string and is not coerced or trimmed (§3.2)."""
    assert read.event_name({"n": " Signed Up "}, "n") == " Signed Up "
    assert verdict(read.event_name, {"n": "  "}, "n").reason.code == "missing_event_name"
    assert verdict(read.event_name, {}, "n").reason.code == "missing_event_name"
    assert verdict(read.event_name, {"n": 42}, "n").reason.code == "wrong_type:n"


def test_event_name_falls_back_only_over_missing_fields() -> None:
    """A blank or absent first name falls back to the next field; a wrong type does not (§3.2, §4.3)."""
    assert read.event_name({"a": "", "b": "B"}, "a", "b") == "B"
    assert verdict(read.event_name, {"a": ["A"], "b": "B"}, "a", "b").reason.code == "wrong_type:a"


def test_containers_are_objects_or_empty() -> None:
    """Objects are used as is (a copy), null/absent is {}, anything else is wrong_type (§3.3)."""
    inner = {"deep": {"ü": [1, {"x": None}]}}
    record: dict[str, Any] = {"p": inner}
    assert read.container(record, "p") == inner
    assert read.container(record, "p") is not inner
    assert read.container({"p": None}, "p") == {}
    assert read.container({}, "p") == {}
    not_objects: list[Any] = ['{"a":1}', [], 3, True]
    for value in not_objects:
        assert verdict(read.container, {"p": value}, "p").reason.code == "wrong_type:p"


# --- bodies, leftovers, CleverTap casing ------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"", b"{", b"{'a': 1}", b"\xff\xfe", b"\xef\xbb\xbf", b"NaN", b"[1,]"], ids=repr
)
def test_bodies_that_are_not_json_are_invalid_json(body: bytes) -> None:
    """Anything orjson refuses, including non-UTF-8 bytes and a BOM with nothing after it, is invalid_json
    (§3.6); a BOM before JSON is skipped (§6.18)."""
    assert verdict(read.json_body, body).reason.code == "invalid_json"
    assert read.json_body(b"\xef\xbb\xbf{}") == {}


def test_json_body_keeps_unicode() -> None:
    """Valid JSON decodes with unicode intact (§3.3)."""
    assert read.json_body('{"名前":"Zoë"}'.encode()) == {"名前": "Zoë"}


def test_kind_names_json_types() -> None:
    """Reject details name JSON types, not Python ones."""
    values: list[Any] = [None, True, 1, 1.5, "s", [], {}]
    assert [read.kind(v) for v in values] == [
        "null",
        "boolean",
        "integer",
        "number",
        "string",
        "array",
        "object",
    ]


def test_as_object_rejects_other_shapes() -> None:
    """A body or element that is not an object is unexpected_body_shape (§3.6)."""
    assert read.as_object({"a": 1}, "x") == {"a": 1}
    assert verdict(read.as_object, [1], "the body").reason.code == "unexpected_body_shape"


def test_leftovers_are_the_unmapped_keys() -> None:
    """Keys no mapping consumed are kept for context.vendor (§2)."""
    assert read.leftovers({"a": 1, "b": 2, "c": 3}, {"a", "c"}) == {"b": 2}


def test_clevertap_keys_match_ignoring_case_exact_first() -> None:
    """get_folded/fold_keys match case-insensitively, preferring the exact spelling (§4.5)."""
    record = {"Identity": "other", "identity": "exact", "ObjectId": "__g", "Email": "a@b"}
    assert read.get_folded(record, "identity") == "exact"
    assert read.get_folded(record, "objectId") == "__g"
    assert read.get_folded(record, "phone") is None
    folded = read.fold_keys(record, ["identity", "objectId", "email"])
    assert folded == {"Identity": "other", "identity": "exact", "objectId": "__g", "email": "a@b"}
    assert "ObjectId" in record  # the input is not changed


json_trees = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=40,
)


def nesting(value: Any) -> int:
    """The definition: a container is one level deeper than its deepest child; a scalar is 0."""
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


@given(json_trees)
def test_json_depth_is_the_nesting_depth_of_any_json_value(value: Any) -> None:
    """json_depth (level by level) counts exactly the levels of arrays/objects of the recursive definition."""
    assert read.json_depth(value) == nesting(value)


def test_json_depth_of_a_chain_deeper_than_the_recursion_limit() -> None:
    """A 5,000-level chain is measured without recursion."""
    value: Any = 1
    for _ in range(5000):
        value = [value]
    assert read.json_depth(value) == 5000


@given(json_trees, st.integers(0, 6))
def test_nests_within_agrees_with_the_definition_for_any_limit(value: Any, limit: int) -> None:
    """nests_within (orjson writing the value under padding) answers nesting(value) <= limit exactly."""
    assert read.nests_within(value, limit) is (nesting(value) <= limit)


@given(depth=st.integers(100, 400), objects=st.lists(st.booleans(), min_size=400, max_size=400))
def test_nests_within_is_exact_around_the_body_limit(depth: int, objects: list[bool]) -> None:
    """Chains of arrays and objects, either side of MAX_JSON_DEPTH and of orjson's own write limit."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if objects[level] else [value]
    assert read.nests_within(value, read.MAX_JSON_DEPTH) is (depth <= read.MAX_JSON_DEPTH)


def test_the_writable_depth_is_what_orjson_writes_and_one_more_it_refuses() -> None:
    writable = read._writable_depth()
    chain: Any = None
    for _ in range(writable):
        chain = [chain]
    orjson.dumps(chain)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps([chain])


@given(st.integers(-(10**18), 10**18) | st.integers())
def test_an_integer_epoch_is_the_instant_of_its_decimal_value(number: int) -> None:
    """Integer epochs take integer arithmetic; the result is the Decimal rule's (§3.4 rule 1), in UTC."""
    expected = read._from_epoch(Decimal(number))
    found = read.parse_timestamp(number)
    assert found == expected
    assert found is None or found.tzinfo is UTC


iso_parts = st.tuples(
    st.integers(0, 9999),  # year: 0 does not exist, 1 may shift below year 1, 9999 above 9999
    st.integers(0, 13),
    st.integers(0, 32),
    st.integers(0, 25),
    st.integers(0, 60),
    st.integers(0, 61),
    st.none() | st.text("0123456789", min_size=1, max_size=6),
    st.sampled_from(["Z", "+00:00", "-00:00", "+0000", "+05:30", "-0800", "+23:59", "-24:00", "+14:60"]),
)


@given(iso_parts)
def test_the_common_iso_form_reads_as_the_general_rule_reads_it(parts: tuple[Any, ...]) -> None:
    """The common form (seconds, up to 6 fraction digits, a zone) takes datetime.fromisoformat directly:
    the same instant as §3.4 rule 4's general reading (_ISO + _from_iso), or None for both."""
    year, month, day, hour, minute, second, fraction, zone = parts
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    text += (f".{fraction}" if fraction is not None else "") + zone
    assert read._ISO_COMMON.fullmatch(text)
    match = read._ISO.fullmatch(text)
    assert match is not None
    expected = read._from_iso(match)
    found = read.parse_timestamp(text)
    assert found == expected
    assert found is None or found.tzinfo is UTC


def fold_keys_by_definition(record: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """fold_keys as §4.5 states it: per key, the exact spelling, else the first key that folds to it."""
    out = dict(record)
    for key in keys:
        found = key if key in out else next((k for k in out if k.casefold() == key.casefold()), None)
        if found is not None and found != key:
            out[key] = out.pop(found)
    return out


cased_names = st.text("aAbBßSs", min_size=1, max_size=3)


@given(st.dictionaries(cased_names, st.integers(), max_size=8), st.lists(cased_names, max_size=6))
def test_fold_keys_renames_as_the_definition_does(record: dict[str, Any], keys: list[str]) -> None:
    folded = read.fold_keys(record, keys)
    expected = fold_keys_by_definition(record, keys)
    assert folded == expected
    assert list(folded) == list(expected)

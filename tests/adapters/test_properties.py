"""Property tests over all adapters: any input ends as drafts or Reject verdicts, never a crash.

An exception other than Reject would be an adapter bug (docs/sources.md §1); these
tests feed arbitrary bodies and records, biased towards the field names the adapters read.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import ADAPTERS
from pipeline.adapting import AdapterModule, Draft, Reject
from pipeline.records import RawHeaders

# Shared and per-source field names, the envelope names the parsers build, and CleverTap casings.
FIELDS = """
    event_id event_name user_id timestamp event_properties type event messageId userId anonymousId
    originalTimestamp sentAt receivedAt properties context traits groupId previousId name category
    events event_code event_uuid uid event_time event_attributes user_attributes device_attributes
    moengage_device_id email_id mobile_number $insert_id insert_id uuid event_type device_id time
    client_event_time user_properties targetId key_values profiles is_test identity objectId profileData
    Identity ObjectId envelope profile event_data system_data license_code anonymous_id api_key user id
    _timestamp utc_time eventn_ctx eventn_ctx_event_id vendor
""".split()
WORDS = [
    "", " ", "track", "identify", "page", "screen", "group", "alias", "ak_demo", "~demo5678", "true",
    "2024-03-01T12:00:00Z", "2024-03-01 12:00:00.123456789", "2024-03-01T12:00+0530", "$D_1709294400",
    "$D_-99999999999", "1709294400000", "99999999999999999", "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-05:00",
]  # fmt: skip
SOURCES = sorted(ADAPTERS)

text = st.text(st.characters(codec="utf-8"), max_size=12)  # no lone surrogates: JSON text is UTF-8
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can decode as an integer
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(WORDS)
    | text
)
keys = st.sampled_from(FIELDS) | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=12,
)
records = st.dictionaries(keys, json_values, max_size=8)
# Real bodies from the vectors, for mutation: most random records fail at the first check.
EXAMPLES = [
    (path.parent.name, vector["body"])
    for path in sorted((Path(__file__).parent / "vectors").glob("*/*.json"))
    if "body" in (vector := json.loads(path.read_text(encoding="utf-8")))
]


@st.composite
def mutated_examples(draw: st.DrawFn) -> tuple[str, Any]:
    """A vector body with one key of one of its objects set to an arbitrary JSON value."""
    source, body = draw(st.sampled_from(EXAMPLES))
    body = copy.deepcopy(body)
    objects = list(_objects(body))
    if objects:
        target = draw(st.sampled_from(objects))
        key = draw(st.sampled_from(sorted(target)) | keys) if target else draw(keys)
        target[key] = draw(json_values | st.sampled_from(WORDS))
    return source, body


def _objects(value: Any) -> Any:
    if isinstance(value, dict):
        yield value
        for inner in value.values():
            yield from _objects(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _objects(inner)


def meta(source: str, request_id: str | None = "req-1") -> RawHeaders:
    return RawHeaders(
        tenant="demo",
        source=source,
        received_at=datetime(2024, 3, 1, 12, tzinfo=UTC),
        request_id="r1",
        vendor=vendor_meta(source, request_id),
    )


def vendor_meta(source: str, request_id: str | None) -> dict[str, str]:
    """The request metadata the receiver stores for a source (what its adapter declares)."""
    if source == "webengage":
        return {"license_code": "~demo5678"} | ({"request_id": request_id} if request_id else {})
    if source == "usermaven":
        return {"api_key": "ak_demo"}
    return {}


def run(adapter: AdapterModule, body: bytes, raw_meta: RawHeaders) -> list[Draft | Reject]:
    """Parse and normalize like the driver; anything but Reject propagates and fails the test."""
    try:
        records = adapter.parse(body, raw_meta)
    except Reject as verdict:
        return [verdict]
    out: list[Draft | Reject] = []
    for record in records:
        try:
            out.append(adapter.normalize(record, raw_meta))
        except Reject as verdict:
            out.append(verdict)
    return out


def check_draft(source: str, draft: Draft) -> None:
    """The invariants the canonical model relies on (docs/sources.md §2)."""
    assert isinstance(draft.event_name, str) and draft.event_name.strip()
    assert draft.user_id is not None or draft.anonymous_id is not None
    assert draft.vendor_event_id is None or 1 <= len(draft.vendor_event_id) <= 256
    if draft.timestamp is None:
        assert source in ("clevertap", "usermaven")
    else:
        assert draft.timestamp.utcoffset() == timedelta(0)
    assert all(isinstance(part, dict) for part in (draft.properties, draft.user_traits, draft.context))


@settings(max_examples=200, deadline=None)
@given(source=st.sampled_from(SOURCES), body=json_values | records | st.lists(records, max_size=3))
def test_any_json_body_gives_drafts_or_rejects(source: str, body: Any) -> None:
    """Any JSON body ends as drafts and Reject verdicts only (docs/sources.md §1)."""
    for outcome in run(ADAPTERS[source], orjson.dumps(body), meta(source)):
        if isinstance(outcome, Draft):
            check_draft(source, outcome)


@settings(max_examples=200, deadline=None)
@given(example=mutated_examples())
def test_mutated_real_bodies_give_drafts_or_rejects(example: tuple[str, Any]) -> None:
    """A real body with one field set to any JSON value still ends as drafts or rejects (§1, §3)."""
    source, body = example
    for outcome in run(ADAPTERS[source], orjson.dumps(body), meta(source)):
        if isinstance(outcome, Draft):
            check_draft(source, outcome)


@settings(max_examples=200, deadline=None)
@given(source=st.sampled_from(SOURCES), body=st.binary(max_size=64))
def test_any_bytes_give_drafts_or_rejects(source: str, body: bytes) -> None:
    """Arbitrary bytes, including non-UTF-8, never crash an adapter (docs/sources.md §3.6 invalid_json)."""
    run(ADAPTERS[source], body, meta(source))


@settings(max_examples=200, deadline=None)
@given(source=st.sampled_from(SOURCES), record=json_values | records, request_id=st.none() | text)
def test_any_record_normalizes_or_rejects(source: str, record: Any, request_id: str | None) -> None:
    """normalize() of any JSON record returns a valid draft or raises Reject."""
    raw_meta = meta(source, request_id)
    try:
        draft = ADAPTERS[source].normalize(record, raw_meta)
    except Reject:
        return
    check_draft(source, draft)


@settings(max_examples=200, deadline=None)
@given(example=mutated_examples())
def test_adapters_are_pure(example: tuple[str, Any]) -> None:
    """Adapters do not mutate their input and give equal outputs for equal inputs."""
    source, body = example
    adapter, raw_meta = ADAPTERS[source], meta(source)
    try:
        parsed = adapter.parse(orjson.dumps(body), raw_meta)
    except Reject:
        return
    for record in parsed:
        before = copy.deepcopy(record)
        first = _outcome(adapter, record, raw_meta)
        assert record == before
        assert _outcome(adapter, record, raw_meta) == first


def _outcome(adapter: AdapterModule, record: Any, raw_meta: RawHeaders) -> Draft | tuple[str, str]:
    try:
        return adapter.normalize(record, raw_meta)
    except Reject as verdict:
        return (verdict.reason.code, verdict.detail)

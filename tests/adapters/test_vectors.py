"""Every vector under vectors/<source>/ through its adapter and through the real driver.

One runner for all sources (docs/sources.md §4): the adapter alone gives drafts and rejections; the driver
(`pipeline.stream.record_outcomes.outcomes`) adds validation, fingerprinting and the dead letters themselves.
A vector holds `body` (a JSON value), `raw_body` (text
sent as is, for invalid JSON) or `raw_body_b64` (bytes), optional `meta` overrides, and the
`expected` outcomes in order: the draft fields it lists, or {"reason", "index"[, "path"]}.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import ADAPTERS
from pipeline.adapting import AdapterModule, Draft, Reject
from pipeline.reasons import UNKNOWN, lookup
from pipeline.records import CanonicalEvent, DeadLetter, Origin, RawHeaders, RawRecord, format_utc
from pipeline.stream.record_outcomes import outcomes as driver_outcomes

VECTORS = Path(__file__).parent / "vectors"
CASES = sorted(VECTORS.glob("*/*.json"))


def meta(source: str, **overrides: Any) -> RawHeaders:
    return RawHeaders(
        tenant="demo",
        source=source,
        received_at=datetime(2024, 3, 1, 12, tzinfo=UTC),
        request_id="r1",
        **overrides,
    )


def body_bytes(vector: dict[str, Any]) -> bytes:
    if "raw_body" in vector:
        return str(vector["raw_body"]).encode()
    if "raw_body_b64" in vector:
        return base64.b64decode(vector["raw_body_b64"])
    return orjson.dumps(vector["body"])


def draft_fields(draft: Draft) -> dict[str, Any]:
    return {
        "event_name": draft.event_name,
        "user_id": draft.user_id,
        "anonymous_id": draft.anonymous_id,
        "vendor_event_id": draft.vendor_event_id,
        "timestamp": None if draft.timestamp is None else format_utc(draft.timestamp),
        "properties": draft.properties,
        "user_traits": draft.user_traits,
        "context": draft.context,
        "fingerprint_extra": None if draft.fingerprint_extra is None else dict(draft.fingerprint_extra),
    }


def outcomes(adapter: AdapterModule, body: bytes, raw_meta: RawHeaders) -> list[dict[str, Any]]:
    """What the driver would emit, as plain dicts: a parse Reject is one dead letter with no index."""
    try:
        records = adapter.parse(body, raw_meta)
    except Reject as verdict:
        return [{"reason": verdict.reason.code, "index": None, "path": verdict.path}]
    out: list[dict[str, Any]] = []
    for position, record in enumerate(records):
        index = position if adapter.BATCHED else None
        try:
            out.append(draft_fields(adapter.normalize(record, raw_meta)))
        except Reject as verdict:
            out.append({"reason": verdict.reason.code, "index": index, "path": verdict.path})
    return out


def load(path: Path) -> dict[str, Any]:
    vector: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return vector


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_vector(path: Path) -> None:
    """A vector's body gives exactly its expected outcomes, in request order (docs/sources.md §1, §3.6,
    §4)."""
    vector = load(path)
    source = path.parent.name
    adapter = ADAPTERS[source]
    actual = outcomes(adapter, body_bytes(vector), meta(source, **vector.get("meta", {})))
    expected = vector["expected"]
    # Compare only the fields each expected outcome names.
    assert [
        {key: got.get(key, "<absent>") for key in want} for want, got in zip(expected, actual, strict=False)
    ] == expected
    assert len(actual) == len(expected), actual


def test_every_source_has_vectors_and_its_spec_example() -> None:
    """Each source is covered by vectors, starting with its docs/sources.md §4 example."""
    for source in ADAPTERS:
        names = {path.stem for path in (VECTORS / source).glob("*.json")}
        assert any(name.startswith("spec_example") for name in names), source


def test_vector_reasons_are_catalogued() -> None:
    """Every reason a vector expects is a catalogue code, not the generic fallback (docs/sources.md §3.6)."""
    for path in CASES:
        for want in load(path)["expected"]:
            if "reason" in want:
                assert lookup(want["reason"]) is not UNKNOWN, (path, want["reason"])


def test_vectors_state_their_rule() -> None:
    """Each vector says which rule it checks and where the spec states it."""
    for path in CASES:
        vector = load(path)
        assert vector["rule"] and vector["spec"].startswith("§"), path
        assert sum(key in vector for key in ("body", "raw_body", "raw_body_b64")) == 1, path


def driver_view(outcome: CanonicalEvent | DeadLetter) -> dict[str, Any]:
    """What the real driver (pipeline.stream.record_outcomes.outcomes) made of an item, in a vector's
    terms."""
    if isinstance(outcome, DeadLetter):
        path = outcome.errors[0].path if outcome.errors else None
        return {"reason": outcome.reason, "index": outcome.index, "path": path}
    context = dict(outcome.context)
    timestamp: str | None = format_utc(outcome.timestamp)
    if context.pop("timestamp_source", None) == "received_at":
        assert outcome.timestamp == outcome.received_at
        timestamp = None
    return {
        "event_name": outcome.event_name,
        "user_id": outcome.user_id,
        "anonymous_id": outcome.anonymous_id,
        "vendor_event_id": None if outcome.event_id_derived else outcome.event_id,
        "timestamp": timestamp,
        "properties": outcome.properties,
        "user_traits": outcome.user_traits,
        "context": context,
    }


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_vector_through_the_driver(path: Path) -> None:
    """The driver turns a vector's body into its expected outcomes: validated canonical events (with ids
    fingerprinted where the vendor sent none) and dead letters that keep the exact body."""
    vector = load(path)
    source = path.parent.name
    body = body_bytes(vector)
    origin = Origin(topic=f"raw.{source}", partition=0, offset=7)
    raw = RawRecord(body=body, headers=meta(source, **vector.get("meta", {})), origin=origin)
    made = list(driver_outcomes(raw, ADAPTERS[source]))
    actual = [driver_view(outcome) for outcome in made]
    expected = [{k: v for k, v in want.items() if k != "fingerprint_extra"} for want in vector["expected"]]
    assert [
        {key: got.get(key, "<absent>") for key in want} for want, got in zip(expected, actual, strict=False)
    ] == (expected)
    assert len(actual) == len(expected), actual
    letters = [outcome for outcome in made if isinstance(outcome, DeadLetter)]
    if letters:  # the body is stored once per raw record: the first letter carries it, the others point to it
        assert letters[0].body == body
        assert all(x.body_ref == letters[0].id and x.origin == origin for x in letters[1:])
    for outcome in made:
        if not isinstance(outcome, DeadLetter):
            assert outcome.event_id and outcome.tenant == "demo" and outcome.source == source

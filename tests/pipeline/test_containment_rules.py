"""Containment rules of the normalize step, for any body: every item of a raw
record becomes a canonical event or a dead letter, every output can be written, and the body is stored
once."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import ADAPTERS
from pipeline import reading
from pipeline.adapting import Reject
from pipeline.records import DeadLetter, KeyedBatch, RawHeaders, utc_now
from pipeline.stream.dead_letter_budget import ITEM_LETTERS
from pipeline.stream.normalize_batch import NormalizeTargets, normalize_batch

TARGETS = NormalizeTargets("keyed", "dlq", 3, 5, max_event_bytes=4096)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
segment_items = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["track", "identify", "page", "bogus"]),
            "messageId": st.text(max_size=300),
            "userId": st.one_of(st.none(), st.text(max_size=10)),
            "event": st.text(max_size=10),
            "timestamp": st.sampled_from(["2024-03-01T12:00:00Z", "yesterday", 1709294400]),
            "properties": json_values,
        },
    ),
)


def nested(depth: int) -> bytes:
    """JSON text nesting objects and arrays `depth` levels deep (orjson cannot write 255 or more)."""
    openers = [b'{"k":' if level % 2 == 0 else b"[" for level in range(depth)]
    closers = [b"}" if level % 2 == 0 else b"]" for level in reversed(range(depth))]
    return b"".join(openers) + b'"leaf"' + b"".join(closers)


def record(body: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    headers = RawHeaders(tenant="acme", source="segment", received_at=utc_now(), request_id=f"r{offset}")
    return ConsumerRecord("raw.segment", 0, offset, 0, 0, None, body, None, len(body), 0, headers.to_kafka())


class Sink:
    """A send callable that keeps what it is given, acknowledging at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def __call__(
        self, topic: str, key: bytes | None, value: bytes, partition: int | None, headers: Any
    ) -> Awaitable[None]:
        self.sent.append((topic, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def letters(self) -> list[DeadLetter]:
        return [DeadLetter.from_json(v) for t, v in self.sent if t == "dlq"]

    def events(self) -> list[bytes]:
        return [e for t, v in self.sent if t == "keyed" for _, _, e in KeyedBatch.entries(v)]


def run(body: bytes) -> Sink:
    sink = Sink()
    asyncio.run(normalize_batch([record(body)], ADAPTERS["segment"], sink, TARGETS))
    return sink


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(segment_items, max_size=6), depth=st.sampled_from([0, 0, 0, 100, 200, 300]))
def test_every_item_of_any_body_is_an_event_or_a_dead_letter(items: list[Any], depth: int) -> None:
    """Whatever the items (deep, huge ints, floats, wrong shapes), each one yields exactly one output, or
    the whole body one dead letter; every event is valid JSON and every dead letter round-trips."""
    body = orjson.dumps(items)
    if depth:
        body = body[:-1] + (b"," if items else b"") + nested(depth) + b"]"
        items = [*items, "deep"]
    sink = run(body)
    letters, events = sink.letters(), sink.events()
    for event in events:
        assert len(orjson.loads(event)) > 0
    if depth > reading.MAX_JSON_DEPTH:
        assert [d.reason for d in letters] == ["nesting_too_deep"] and events == []
    else:
        assert len(letters) + len(events) == len(items)
        known = [d.index for d in letters if d.index is not None]
        assert len(known) == len(set(known)) == len({d.index for d in letters})  # each index once, none None
    carriers = [d for d in letters if d.body_b64 is not None]
    assert len(carriers) == (1 if letters else 0)
    assert all(d.body_ref == carriers[0].id for d in letters if d.body_b64 is None)
    if carriers:
        assert base64.b64decode(carriers[0].body_b64 or "") == body


@given(depth=st.integers(1, 400))
def test_json_deeper_than_the_limit_is_rejected_at_parse(depth: int) -> None:
    """json_body accepts nesting up to MAX_JSON_DEPTH levels and rejects deeper with nesting_too_deep."""
    body = nested(depth)
    if depth <= reading.MAX_JSON_DEPTH:
        assert reading.json_depth(reading.json_body(body)) == depth
    else:
        with pytest.raises(Reject) as rejected:
            reading.json_body(body)
        assert rejected.value.reason.code == "nesting_too_deep"


def test_an_event_over_the_size_limit_is_its_items_dead_letter() -> None:
    """A canonical event over max_event_bytes becomes output_too_large for its item; its neighbours pass."""
    good = {
        "type": "track",
        "event": "Ok",
        "messageId": "m1",
        "userId": "u",
        "timestamp": "2024-03-01T12:00:00Z",
    }
    big = {**good, "messageId": "m2", "properties": {"blob": "x" * 10_000}}
    sink = run(orjson.dumps([good, big, {**good, "messageId": "m3"}]))
    assert [(d.reason, d.index) for d in sink.letters()] == [("output_too_large", 1)]
    assert [orjson.loads(e)["event_id"] for e in sink.events()] == ["m1", "m3"]


def test_dead_letters_of_a_large_all_failing_body_stay_proportional() -> None:
    """1,000 failing items of a 280 kB body: the body is stored once, the first ITEM_LETTERS items get a
    letter each and one summary letter covers the rest, within 20 x the body + 1 MiB."""
    items = [
        {
            "type": "track",
            "event": "No Identity",
            "messageId": f"m{i}",
            "timestamp": "2024-03-01T12:00:00Z",
            "properties": {"padding": "p" * 250},
        }
        for i in range(1000)
    ]
    body = orjson.dumps(items)
    sink = run(body)
    total = sum(len(v) for t, v in sink.sent if t == "dlq")
    letters = sink.letters()
    assert len(letters) == ITEM_LETTERS + 1
    assert [d.reason for d in letters].count("more_failed_items") == 1
    assert total <= 20 * len(body) + 1024 * 1024


def test_an_oversized_element_is_kept_truncated() -> None:
    """An offending item bigger than ELEMENT_MAX_BYTES is kept as the start of its JSON, marked truncated."""
    item = {"type": "track", "event": "No Identity", "messageId": "m1", "properties": {"big": "y" * 50_000}}
    [letter] = run(orjson.dumps([item])).letters()
    assert letter.element_truncated
    assert isinstance(letter.element, str) and len(letter.element) <= DeadLetter.ELEMENT_MAX_BYTES


def test_a_property_key_json_cannot_hold_makes_its_item_unserializable_and_the_others_flow() -> None:
    """The canonical model checks that properties is an object, not each key (the adapter's dict is kept
    as it is): an adapter bug that puts a non-string key there becomes that item's dead letter when the
    worker writes the event, and the batch's other items are canonical events."""
    segment = ADAPTERS["segment"]

    def normalize(item: Any, meta: RawHeaders) -> Any:
        draft = segment.normalize(item, meta)
        unserializable: dict[Any, Any] = {1: "x"}  # a non-string key: orjson refuses the event
        return replace(draft, properties=unserializable) if item.get("messageId") == "bad" else draft

    adapter = SimpleNamespace(
        **{n: getattr(segment, n) for n in ("SOURCE", "BATCHED", "parse")}, normalize=normalize
    )
    track = {"type": "track", "event": "Signed Up", "userId": "u1", "timestamp": "2024-03-01T12:00:00Z"}
    body = orjson.dumps(
        [{**track, "messageId": "m1"}, {**track, "messageId": "bad"}, {**track, "messageId": "m3"}]
    )
    sink = Sink()
    asyncio.run(normalize_batch([record(body)], adapter, sink, TARGETS))  # type: ignore[arg-type]
    [letter] = sink.letters()
    assert (letter.reason, letter.index, letter.body) == ("unserializable_output", 1, body)
    assert [orjson.loads(e)["event_id"] for e in sink.events()] == ["m1", "m3"]

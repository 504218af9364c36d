"""The pure driver: no raw record ever comes out as nothing (docs/sources.md §3.6)."""

from __future__ import annotations

import types
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from adapters import ADAPTERS, segment
from pipeline import reasons
from pipeline.records import CanonicalEvent, DeadLetter, Origin, RawHeaders, RawRecord
from pipeline.stream.record_outcomes import outcomes


def raw(body: bytes, source: str = "segment", redrive_count: int = 0) -> RawRecord:
    headers = RawHeaders(
        tenant="acme",
        source=source,
        received_at=datetime(2024, 3, 1, 12, tzinfo=UTC),
        request_id="r1",
        redrive_count=redrive_count,
    )
    return RawRecord(body=body, headers=headers, origin=Origin(topic=f"raw.{source}", partition=0, offset=3))


def crashing(module: Any, where: str) -> Any:
    """The adapter with `where` ("parse" or "normalize") raising a bug, not a Reject."""

    def boom(*args: Any) -> Any:
        raise KeyError("a bug in the adapter")

    fields = {
        name: getattr(module, name)
        for name in ("SOURCE", "BATCHED", "ROUTES", "AUTH", "REQUEST_META", "parse", "normalize")
    }
    return types.SimpleNamespace(**{**fields, where: boom})


TRACK = {
    "type": "track",
    "event": "Signed Up",
    "userId": "u1",
    "messageId": "m1",
    "timestamp": "2024-03-01T12:00:00Z",
}


def test_an_adapter_that_crashes_in_parse_gives_one_adapter_crashed_letter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in parse is logged with its traceback and the whole body is still dead-lettered."""
    [letter] = outcomes(raw(orjson.dumps(TRACK)), crashing(segment, "parse"))
    assert isinstance(letter, DeadLetter)
    assert (letter.reason, letter.stage, letter.index) == (reasons.ADAPTER_CRASHED.code, "parse", None)
    assert "KeyError" in letter.message and letter.body == orjson.dumps(TRACK)
    assert any(r.exc_info for r in caplog.records), "the traceback is logged"


def test_an_adapter_that_crashes_in_normalize_loses_only_that_item() -> None:
    """A bug on one element of a batch dead-letters that element with its index; the others are not lost."""
    body = orjson.dumps([TRACK, {**TRACK, "messageId": "m2"}])
    letters = list(outcomes(raw(body), crashing(segment, "normalize")))
    assert [(x.reason, x.index) for x in letters if isinstance(x, DeadLetter)] == [
        (reasons.ADAPTER_CRASHED.code, 0),
        (reasons.ADAPTER_CRASHED.code, 1),
    ]


def test_a_record_redriven_past_the_limit_is_parked_without_running_the_adapter() -> None:
    """hw-redrive-count over the limit: one redrive_limit letter, the adapter never sees the body."""
    [letter] = outcomes(raw(b"{}", redrive_count=4), crashing(segment, "parse"), redrive_limit=3)
    assert isinstance(letter, DeadLetter) and letter.reason == reasons.REDRIVE_LIMIT.code


def test_a_valid_event_comes_out_validated_with_its_ids() -> None:
    """The driver completes a draft with tenant, source and received_at, and validates it."""
    body = orjson.dumps(
        {"event_id": "e1", "event_name": "kyc", "user_id": "u1", "timestamp": "2024-03-01T12:00:00Z"}
    )
    [event] = outcomes(raw(body, "customerglu"), ADAPTERS["customerglu"])
    assert isinstance(event, CanonicalEvent)
    assert (event.event_id, event.tenant, event.source, event.event_id_derived) == (
        "e1",
        "acme",
        "customerglu",
        False,
    )

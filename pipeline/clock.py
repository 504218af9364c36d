"""Time as the pipeline writes it: UTC, microsecond precision, with an explicit offset.

Every record's times pass through `format_utc`; the receiver stamps each request with `UtcClock`, which
produces the same text without a datetime per call.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with an explicit offset, microsecond precision: 2024-03-01T12:00:00.000000+00:00.

    Written by orjson (a fraction of isoformat's cost), which drops a zero fraction; it is put back, so
    the text is isoformat(timespec="microseconds") exactly (tests/pipeline/test_records.py)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    text = orjson.dumps(moment).decode()  # '"2024-03-01T12:00:00.800000+00:00"', quotes included
    return text[1:-1] if moment.microsecond else text[1:-7] + ".000000+00:00"


def json_utc(moment: datetime) -> datetime | str:
    """What a record's to_json hands orjson for a time: the datetime itself where orjson writes
    format_utc's text (UTC with a fraction), else format_utc's text."""
    return moment if moment.tzinfo is UTC and moment.microsecond else format_utc(moment)


def in_utc(moment: datetime) -> datetime:
    """The same instant, in UTC."""
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


class UtcClock:
    """format_utc of the current time, without a datetime per call: the text up to the second is kept
    for the second it names (the receiver stamps every request; tests prove it equal to format_utc)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def text(self, now_ns: int) -> bytes:
        second, micros = divmod(now_ns // 1000, 1_000_000)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
            self._second = second
        return b"%s.%06d+00:00" % (self._prefix, micros)

"""The contract between the core and an adapter module (one per source, in adapters/).

An adapter is two pure functions: `parse(body, meta) -> [vendor records]` and
`normalize(record, meta) -> Draft`. Either may call `reject(reason, detail)`; the core turns that
into a dead letter (sources.md §3.6). No I/O, no clock, no config inside an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn, Protocol

from pipeline.records import RawHeaders

# Vendor JSON, as orjson decodes it. Narrowed only in pipeline.reading.
JSONValue = Any
VendorRecord = JSONValue
RawMeta = RawHeaders


class Reject(Exception):  # noqa: N818 - a verdict, not an error (like faust's Skip)
    """An adapter's verdict on its input: becomes a dead letter with this reason code and detail.

    Not a HeadwaterError: nothing is wrong with the system, the input is wrong.
    """

    def __init__(self, reason: str, detail: str, path: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.path = path


def reject(reason: str, detail: str, path: str | None = None) -> NoReturn:
    raise Reject(reason, detail, path)


@dataclass(frozen=True, slots=True)
class Draft:
    """One vendor record mapped onto canonical fields, before the core adds tenant/ids/received_at.

    `timestamp=None` means the source legitimately had no time: the core falls back to the
    record's received_at and sets context.timestamp_source = "received_at" (sources.md §2).
    `vendor_event_id=None` means the core derives the fingerprint of §3.5, with `fingerprint_extra`.
    """

    event_name: str
    user_id: str | None
    anonymous_id: str | None
    vendor_event_id: str | None
    timestamp: datetime | None
    properties: dict[str, Any] = field(default_factory=dict)
    user_traits: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    fingerprint_extra: Mapping[str, Any] | None = None


class AdapterModule(Protocol):
    """What adapters/<source>.py exposes; adapters/__init__.py registers them explicitly."""

    SOURCE: str
    BATCHED: bool

    def parse(self, body: bytes, meta: RawMeta) -> list[VendorRecord]: ...

    def normalize(self, record: VendorRecord, meta: RawMeta) -> Draft: ...

"""The raw record: the exact body the receiver accepted, its typed headers, and where it sits in Kafka.

`RawHeaders` owns the Kafka header names and their byte encoding; credentials never get a field.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any, Protocol, Self

from pydantic import AfterValidator, Field, StringConstraints

from pipeline.clock import format_utc, in_utc
from pipeline.records.model import Record, ShortText, UtcDatetime


class RawHeaders(Record):
    """Metadata the receiver attaches to a raw record; adapters read it as their `meta`."""

    tenant: ShortText
    source: ShortText
    # Held in UTC (the same instant): every event of the record is written with it (format_utc).
    received_at: Annotated[UtcDatetime, AfterValidator(in_utc)]
    request_id: ShortText
    content_type: ShortText | None = None
    redrive_count: int = 0
    replay_of: ShortText | None = None  # "topic:partition:offset" of the record replayed
    # What the source's adapter declared it needs from the request (adapting.RequestValue), by name:
    # e.g. WebEngage's request_id (header x-request-id), Usermaven's api_key (the token's API-key half).
    # Stored as hw-<source>-<name> headers; credentials never get one.
    vendor: dict[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")], ShortText] = Field(
        default_factory=dict  # not `= {}`: pydantic deep-copies a mutable default for every instance
    )

    def to_kafka(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for field, name in _HEADER_NAMES.items():
            value = getattr(self, field)
            if value is None or (field == "redrive_count" and value == 0):
                continue
            text = format_utc(value) if isinstance(value, datetime) else str(value)
            out.append((name, text.encode()))
        prefix = _vendor_prefix(self.source)
        out.extend((prefix + name.replace("_", "-"), value.encode()) for name, value in self.vendor.items())
        return out

    @classmethod
    def from_kafka(cls, headers: Iterable[tuple[str, bytes]] | dict[str, bytes]) -> Self:
        """Rebuild from Kafka headers; raises pydantic.ValidationError when required ones are missing.

        The worker's first step for every raw record, so one pass over the headers, and received_at is
        read with datetime.fromisoformat (pydantic's parser costs ~10x more); text it cannot read goes to
        pydantic as it is, which refuses it with its own message."""
        pairs = headers.items() if isinstance(headers, dict) else headers
        doc: dict[str, Any] = {}
        others: list[tuple[str, bytes]] = []
        for name, raw in pairs:
            field = _HEADER_FIELDS.get(name)
            if field is None:
                others.append((name, raw))
            elif raw is not None:
                doc[field] = raw.decode("utf-8", "replace")
            else:
                doc.pop(field, None)  # the last header of a name wins, as a dict of them would have it
        received = doc.get("received_at")
        if received is not None:
            try:
                moment = datetime.fromisoformat(received)
            except ValueError:
                pass
            else:
                if moment.tzinfo is not None:
                    doc["received_at"] = in_utc(moment)
        if others:
            prefix = _vendor_prefix(doc.get("source", ""))
            vendor = {
                name[len(prefix) :].replace("-", "_"): raw.decode("utf-8", "replace")
                for name, raw in others
                if name.startswith(prefix) and raw is not None
            }
            if vendor:
                doc["vendor"] = vendor
        return cls.of(doc)

    def json_headers(self) -> dict[str, str]:
        """Headers as a JSON-friendly {name: text} map (for dead letters and exports)."""
        return {name: value.decode() for name, value in self.to_kafka()}


_HEADER_NAMES = {
    "tenant": "hw-tenant",
    "source": "hw-source",
    "received_at": "hw-received-at",
    "request_id": "hw-request-id",
    "content_type": "hw-content-type",
    "redrive_count": "hw-redrive-count",
    "replay_of": "hw-replay-of",
}
_HEADER_FIELDS = {name: field for field, name in _HEADER_NAMES.items()}


def _vendor_prefix(source: str) -> str:
    """hw-<source>-: the Kafka header names of a source's request metadata (hw-webengage-request-id)."""
    return f"hw-{source}-"


class Origin(Record):
    """Where a raw record sits in Kafka; set once it has been consumed."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None

    def ref(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


class Located(Protocol):
    """Where a consumed Kafka record sits (aiokafka's ConsumerRecord has these)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...


class RawRecord:
    """What the receiver wrote: the exact body plus headers, and (once read back) where it sits.

    A plain class, not a model: it lives inside the worker only (the raw topic carries the body and the
    RawHeaders, its typed part), and its parts are typed already, so validating it again cost the
    worker ~2 us per raw record for nothing. A record read from Kafka (`consumed`) builds its Origin
    only when it is asked for, i.e. for a dead letter: ~1 us a raw record the worker no longer spends.
    """

    __slots__ = ("body", "headers", "_origin", "_located")

    def __init__(self, body: bytes, headers: RawHeaders, origin: Origin | None = None) -> None:
        self.body = body
        self.headers = headers
        self._origin = origin
        self._located: Located | None = None

    @classmethod
    def consumed(cls, message: Located, body: bytes, headers: RawHeaders) -> RawRecord:
        raw = cls(body, headers)
        raw._located = message
        return raw

    @property
    def origin(self) -> Origin | None:
        located = self._located
        if self._origin is None and located is not None:
            self._origin = Origin.of(
                {
                    "topic": located.topic,
                    "partition": located.partition,
                    "offset": located.offset,
                    "timestamp_ms": located.timestamp,
                }
            )
        return self._origin

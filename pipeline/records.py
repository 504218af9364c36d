"""Every record that crosses a topic, typed: RawRecord -> CanonicalEvent | DeadLetter (docs/architecture.md).

`RawHeaders` owns the Kafka header names and their byte encoding; credentials never get a field.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Protocol, Self

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    InstanceOf,
    PlainSerializer,
    SkipValidation,
    StringConstraints,
    model_validator,
)
from typing_extensions import TypeAliasType

from pipeline import __version__

KafkaHeaders = Sequence[tuple[str, bytes]]
# Vendor JSON as orjson decodes it: the one recursive JSON type (adapters and records use it, never Any).
JSONValue = TypeAliasType(
    "JSONValue", "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
)
# An object of JSON values. Values are not re-validated (they come from orjson): the model checks the shape
# (an object with string keys), which is also faster than validating Any.
JSONObject = dict[str, SkipValidation[JSONValue]]

ShortText = Annotated[str, StringConstraints(max_length=256)]
UtcDatetime = Annotated[
    AwareDatetime,
    PlainSerializer(lambda dt: format_utc(dt), return_type=str),
]


def format_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with an explicit offset, microsecond precision: 2024-03-01T12:00:00.000000+00:00.

    Written by orjson (a fraction of isoformat's cost), which drops a zero fraction; it is put back, so
    the text is isoformat(timespec="microseconds") exactly (tests/pipeline/test_records.py)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    text = orjson.dumps(moment).decode()  # '"2024-03-01T12:00:00.800000+00:00"', quotes included
    return text[1:-1] if moment.microsecond else text[1:-7] + ".000000+00:00"


def _json_utc(moment: datetime) -> datetime | str:
    """What to_json hands orjson for a time: the datetime itself where orjson writes format_utc's text
    (UTC with a fraction), else format_utc's text."""
    return moment if moment.tzinfo is UTC and moment.microsecond else format_utc(moment)


def _in_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 characters


_time_part: tuple[int, str] = (-1, "")
_RANDOM_POOL_IDS = 256  # ids' worth of os.urandom bytes read per system call
_random_pool = b""
_random_at = 0


def _forget_random_pool() -> None:
    """A forked child must not hand out the random bytes its parent will use too."""
    global _random_pool, _random_at
    _random_pool, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random_pool)


def new_request_id(now_ns: int | None = None) -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, Crockford base32; unique and sortable by time.

    Two characters per lookup; the ten characters of the time are kept for their millisecond, and the
    random bits come from os.urandom 256 ids at a time, each byte used once (the receiver makes one id
    per request, several per millisecond under load: 3.8-4.6 -> 2.7-2.9 us of CPU an id)."""
    global _time_part, _random_pool, _random_at
    millis = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    if _time_part[0] != millis:
        _time_part = (millis, "".join([_PAIRS[(millis >> shift) & 1023] for shift in (40, 30, 20, 10, 0)]))
    at = _random_at
    if at == len(_random_pool):
        _random_pool, at = os.urandom(10 * _RANDOM_POOL_IDS), 0
    _random_at = at + 10
    r = int.from_bytes(_random_pool[at : at + 10], "big")
    p = _PAIRS
    return "".join(
        (
            _time_part[1],
            p[r >> 70],
            p[r >> 60 & 1023],
            p[r >> 50 & 1023],
            p[r >> 40 & 1023],
            p[r >> 30 & 1023],
            p[r >> 20 & 1023],
            p[r >> 10 & 1023],
            p[r & 1023],
        )
    )


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


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> Self:
        """model_validate(fields) for the worker's per-record models: the validator called without
        model_validate's keyword arguments, whose passing costs about as much as validating a small model."""
        return cls.__pydantic_validator__.validate_python(fields)  # type: ignore[no-any-return]


# --- raw record ---------------------------------------------------------------------------------------


class RawHeaders(_Record):
    """Metadata the receiver attaches to a raw record; adapters read it as their `meta`."""

    tenant: ShortText
    source: ShortText
    # Held in UTC (the same instant): every event of the record is written with it (format_utc).
    received_at: Annotated[UtcDatetime, AfterValidator(_in_utc)]
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
                    doc["received_at"] = _in_utc(moment)
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


class Origin(_Record):
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


# --- canonical event ----------------------------------------------------------------------------------


class CanonicalEvent(_Record):
    """The one clean shape every source ends up in (docs/architecture.md, "The canonical event")."""

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    event_id_derived: bool
    event_name: Annotated[str, StringConstraints(min_length=1, strip_whitespace=False)]
    tenant: ShortText
    source: ShortText
    user_id: str | None
    anonymous_id: str | None
    timestamp: UtcDatetime
    received_at: UtcDatetime
    # The adapter's own dicts, checked to be dicts and kept as they are: validating each key and copying the
    # dict cost ~0.5 us an event, and a key orjson cannot write still becomes its item's dead letter
    # (unserializable_output, when the worker writes the event).
    properties: InstanceOf[JSONObject]
    user_traits: InstanceOf[JSONObject]
    context: InstanceOf[JSONObject]
    schema_version: Literal[1] = 1

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="after")
    def _someone(self) -> Self:
        if self.user_id is None and self.anonymous_id is None:
            raise ValueError("at least one of user_id, anonymous_id is required")
        if not self.event_name.strip():
            raise ValueError("event_name must not be blank")
        return self

    def to_json(self) -> bytes:
        """The event as JSON, fields in declaration order; equal to model_dump(mode="json") serialized,
        without pydantic's per-field serializer calls (the worker's hottest path). The fields are read
        from the instance dict, which pydantic fills in declaration order; the two times are replaced in
        place, so the order holds (and where orjson writes both as they are, the dict is written as it is)."""
        fields = self.__dict__
        timestamp, received_at = _json_utc(fields["timestamp"]), _json_utc(fields["received_at"])
        if timestamp is fields["timestamp"] and received_at is fields["received_at"]:
            return orjson.dumps(fields)  # orjson writes both times as format_utc does: no copy needed
        return orjson.dumps({**fields, "timestamp": timestamp, "received_at": received_at})

    def dedup_key(self) -> str:
        """The dedup table's key (as UTF-8): dedup is per (tenant, event_id). Tenant ids contain no '/'."""
        return f"{self.tenant}/{self.event_id}"

    def kafka_key(self) -> str:
        """Kafka key on events.canonical (as UTF-8): tenant + user, so one user's events share a partition."""
        who = self.user_id if self.user_id is not None else f"anon:{self.anonymous_id}"
        return f"{self.tenant}/{who}"


# --- dead letter --------------------------------------------------------------------------------------

Stage = Literal["parse", "normalize", "validate"]
# The stage loop that wrote a letter, and so what its body is: the normalize stage keeps the raw request,
# the dedup stage a canonical event (it never sees the request).
WorkerStage = Literal["normalize", "dedup"]
# Where `headwater dlq redrive` sends a letter's body: "raw" republishes the request to raw.<source> (the
# adapter runs again); "keyed" sends the canonical event to the keyed topic, where the dedup rules decide
# again (an event Kafka refused was never marked seen, so it comes out once).
RedriveTarget = Literal["raw", "keyed"]


class FieldError(_Record):
    path: str
    message: str


class Processor(_Record):
    """Which release rejected the record, so a redrive after a fix can be judged."""

    name: str = "headwater"
    version: str = __version__


class DeadLetter(_Record):
    """A failure a person can read and the system can replay: reason + exact original bytes.

    The body is stored once per raw record: the record's first dead letter carries it in `body_b64`,
    the others name that letter in `body_ref` (pipeline.ops.dlq.read_snapshot resolves it), so a bulk
    request whose every item fails costs its body once, not once per item. `element` is the failed item
    up to ELEMENT_MAX_BYTES of JSON; beyond that it is the start of its JSON text and `element_truncated`.
    """

    ELEMENT_MAX_BYTES: ClassVar[int] = 2048
    TEXT_MAX_CHARS: ClassVar[int] = 1024  # message and per-field error messages

    id: str
    stage: Stage
    reason: str
    message: str
    errors: tuple[FieldError, ...] = ()
    tenant: str
    source: str
    origin: Origin
    headers: dict[str, str]
    body_b64: str | None = None
    body_ref: str | None = None  # the id of the dead letter of the same raw record that carries the body
    element: SkipValidation[JSONValue] = None
    element_truncated: bool = False
    index: int | None = None
    failed_at: UtcDatetime
    redrive_count: int = 0
    processor: Processor = Processor()
    # Letters of earlier releases lack both: they were all written by the normalize stage, about raw requests.
    worker_stage: WorkerStage = "normalize"
    redrive_to: RedriveTarget = "raw"

    @model_validator(mode="after")
    def _body_once(self) -> Self:
        if (self.body_b64 is None) == (self.body_ref is None):
            raise ValueError("a dead letter carries either body_b64 or body_ref")
        return self

    @staticmethod
    def capped_element(element: Any) -> tuple[Any, bool]:
        """(element, truncated): the item itself if its JSON fits ELEMENT_MAX_BYTES, else its JSON's start."""
        if element is None or isinstance(element, bool | int | float):
            return element, False
        try:
            text = orjson.dumps(element)
        except TypeError:
            return repr(element)[: DeadLetter.ELEMENT_MAX_BYTES], True
        if len(text) <= DeadLetter.ELEMENT_MAX_BYTES:
            return element, False
        return text[: DeadLetter.ELEMENT_MAX_BYTES].decode("utf-8", "ignore"), True

    @staticmethod
    def capped_text(text: str) -> str:
        limit = DeadLetter.TEXT_MAX_CHARS
        return text if len(text) <= limit else text[: limit - 1] + "\u2026"

    @staticmethod
    def make_id(origin: Origin, index: int | None) -> str:
        """Deterministic: the same raw record and item give the same id on every replay."""
        material = f"{origin.topic}\x00{origin.partition}\x00{origin.offset}\x00{index}".encode()
        return "dl_" + hashlib.sha256(material).hexdigest()[:24]

    @property
    def body(self) -> bytes:
        """The original bytes; a letter read with only a body_ref must be resolved first (read_snapshot)."""
        if self.body_b64 is None:
            raise ValueError(f"dead letter {self.id} stores its body in {self.body_ref}; resolve it first")
        return base64.b64decode(self.body_b64)

    def with_body_of(self, carrier: DeadLetter) -> Self:
        """This letter with the body of the letter its body_ref names (the body string is shared)."""
        return self.model_copy(update={"body_b64": carrier.body_b64, "body_ref": None})

    def raw_headers(self) -> RawHeaders:
        return RawHeaders.from_kafka({k: v.encode() for k, v in self.headers.items()})

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        return cls.model_validate_json(data)


def encode_body(body: bytes) -> str:
    return base64.b64encode(body).decode("ascii")


# --- keyed candidates (internal topic) ---------------------------------------------------------------


class KeyedBatch:
    """Canonical candidates for one partition of the keyed topic, packed into one Kafka record.

    The dedup stage pays Kafka's per-record costs once per pack instead of once per event. A pack is a
    JSON header line {"keys": [[dedup_key, canonical_key], ...]} and then one canonical-event JSON line
    per key, in the same order (orjson never writes a raw newline), so the keys cost one JSON call per
    pack and the event bytes pass through to events.canonical untouched.
    """

    MAX_BYTES = 256 * 1024  # a pack this big is sent and a new one started

    __slots__ = ("keys", "events", "size")

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []
        self.events: list[bytes] = []
        self.size = 0

    def add(self, event: CanonicalEvent) -> None:
        """Pack an event; raises orjson.JSONEncodeError if it cannot be written as JSON."""
        self.add_json(event.dedup_key(), event.kafka_key(), event.to_json())

    def add_json(self, dedup_key: str, canonical_key: str, event_json: bytes) -> None:
        self.keys.append((dedup_key, canonical_key))
        self.events.append(event_json)
        self.size += len(event_json) + len(dedup_key) + len(canonical_key) + 8

    def to_bytes(self) -> bytes:
        # Cannot fail: every part of a key is also in its event's JSON, which orjson has written already.
        return b"\n".join([orjson.dumps({"keys": self.keys}), *self.events])

    @staticmethod
    def entries(value: bytes) -> list[tuple[bytes, bytes, bytes]]:
        """(dedup_key, canonical_key, canonical_json) per event."""
        header, _, events = value.partition(b"\n")
        if not header.startswith(b"{"):  # a pack of an earlier release: [dedup_key, canonical_key] TAB event
            return _tabbed_entries(value)
        keys = orjson.loads(header)["keys"]
        return [
            (dedup_key.encode(), canonical_key.encode(), event)
            for (dedup_key, canonical_key), event in zip(keys, events.split(b"\n"), strict=True)
        ]


def _tabbed_entries(value: bytes) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for line in value.split(b"\n"):
        keys, _, event = line.partition(b"\t")
        dedup_key, canonical_key = orjson.loads(keys)
        out.append((dedup_key.encode(), canonical_key.encode(), event))
    return out


class ReplayTag(_Record):
    """Marks the keyed records of one `headwater replay` run, so the dedup stage can report on them."""

    replay_id: str
    reemit: bool = False

    def to_headers(self) -> list[tuple[str, bytes]]:
        return [("hw-replay-id", self.replay_id.encode()), ("hw-reemit", b"1" if self.reemit else b"0")]

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]] | None) -> ReplayTag | None:
        found = dict(headers or ())
        if "hw-replay-id" not in found:
            return None
        return cls(replay_id=found["hw-replay-id"].decode(), reemit=found.get("hw-reemit") == b"1")

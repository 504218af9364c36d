"""The dead letter: a failure a person can read and the system can replay, as written to events.dlq."""

from __future__ import annotations

import base64
import hashlib
from typing import Any, ClassVar, Literal, Self

import orjson
from pydantic import SkipValidation, model_validator

from pipeline import __version__
from pipeline.records.model import JSONValue, Record, UtcDatetime
from pipeline.records.raw import Origin, RawHeaders

Stage = Literal["parse", "normalize", "validate"]
# The stage loop that wrote a letter, and so what its body is: the normalize stage keeps the raw request,
# the dedup stage a canonical event (it never sees the request).
WorkerStage = Literal["normalize", "dedup"]
# Where `headwater dlq redrive` sends a letter's body: "raw" republishes the request to raw.<source> (the
# adapter runs again); "keyed" sends the canonical event to the keyed topic, where the dedup rules decide
# again (an event Kafka refused was never marked seen, so it comes out once).
RedriveTarget = Literal["raw", "keyed"]


class FieldError(Record):
    path: str
    message: str


class FailureSummary(Record):
    """The failing items of one request beyond those dead-lettered one by one: how many per reason, and
    where they are (inclusive index ranges, the first MAX_RANGES of them)."""

    MAX_RANGES: ClassVar[int] = 1000

    items: int
    counts: dict[str, int]
    ranges: tuple[tuple[int, int], ...] = ()
    ranges_truncated: bool = False


class Processor(Record):
    """Which release rejected the record, so a redrive after a fix can be judged."""

    name: str = "headwater"
    version: str = __version__


class DeadLetter(Record):
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
    # On a `more_failed_items` letter only: the request's failing items not dead-lettered one by one.
    summary: FailureSummary | None = None

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

"""Every record that crosses a topic, typed: RawRecord -> CanonicalEvent | DeadLetter (docs/architecture.md).

One module per record; the names are re-exported here, so `from pipeline.records import ...` is the one
import the rest of the code uses.
"""

from pipeline.clock import UtcClock, format_utc, utc_now
from pipeline.records.canonical import CanonicalEvent
from pipeline.records.dead_letter import (
    DeadLetter,
    FailureSummary,
    FieldError,
    Processor,
    RedriveTarget,
    Stage,
    WorkerStage,
    encode_body,
)
from pipeline.records.keyed import KeyedBatch, ReplayTag
from pipeline.records.model import JSONObject, JSONValue, KafkaHeaders, Record, ShortText, UtcDatetime
from pipeline.records.raw import Located, Origin, RawHeaders, RawRecord
from pipeline.request_ids import new_request_id

__all__ = [
    "CanonicalEvent",
    "DeadLetter",
    "FailureSummary",
    "FieldError",
    "JSONObject",
    "JSONValue",
    "KafkaHeaders",
    "KeyedBatch",
    "Located",
    "Origin",
    "Processor",
    "RawHeaders",
    "RawRecord",
    "RedriveTarget",
    "Record",
    "ReplayTag",
    "ShortText",
    "Stage",
    "UtcClock",
    "UtcDatetime",
    "WorkerStage",
    "encode_body",
    "format_utc",
    "new_request_id",
    "utc_now",
]

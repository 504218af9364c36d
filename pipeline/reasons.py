"""The reason catalogues: every code an adapter, the driver, validation or the rewards side may report.

Event codes are docs/sources.md §3.6 plus our own (adapter_crashed, validation_failed,
invalid_raw_headers, redrive_limit, and the containment codes nesting_too_deep, unserializable_output,
output_too_large, output_refused); reward codes are those of rewards.dlq. `reject()` and the dead-letter
constructors take a `Reason`, never a string, so a misspelt code is a name error.
Modelled on aiokafka's errors.py: one record per code and a lookup table, so docs/reasons.md and
the DLQ tooling read the same list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.records import Stage

RewardStage = Literal["intake", "delivery"]


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason code, the stage that usually reports it, and a sentence for people.

    `stage` is where the check normally runs; the dead letter records where it actually ran
    (e.g. unexpected_body_shape is a parse failure for a whole body, a normalize failure for one
    element of a batch).
    """

    code: str
    stage: Stage | RewardStage
    summary: str

    def about(self, field: str) -> Reason:
        """The parametrized form <code>:<field>, e.g. wrong_type:user_id; `lookup` maps it back here."""
        return Reason(f"{self.code}:{field}", self.stage, self.summary)


INVALID_JSON = Reason(
    "invalid_json", "parse", "The body is not JSON (or not UTF-8); the whole request is dead-lettered."
)
UNEXPECTED_BODY_SHAPE = Reason(
    "unexpected_body_shape",
    "parse",
    "The body, or one element of a batch, does not have the shape the source sends.",
)
API_KEY_MISMATCH = Reason(
    "api_key_mismatch",
    "normalize",
    "Usermaven: the body's api_key differs from the API-key half of the token.",
)
LICENSE_CODE_MISMATCH = Reason(
    "license_code_mismatch",
    "normalize",
    "WebEngage: the body's license_code differs from the licenseCode query value.",
)
TEST_PAYLOAD = Reason(
    "test_payload", "normalize", "CleverTap: the template test request (is_test); never a real event."
)
UNSUPPORTED_TYPE = Reason(
    "unsupported_type",
    "normalize",
    "Segment: a message type other than track/identify/page/screen/group/alias.",
)
MISSING_EVENT_NAME = Reason("missing_event_name", "normalize", "The event name is absent, null or blank.")
MISSING_USER_IDENTITY = Reason(
    "missing_user_identity", "normalize", "Neither a user id nor an anonymous id is present."
)
INVALID_EVENT_ID = Reason(
    "invalid_event_id", "normalize", "The vendor's event id is longer than 256 characters."
)
MISSING_TIMESTAMP = Reason(
    "missing_timestamp", "normalize", "The source must send an event time and did not."
)
INVALID_TIMESTAMP = Reason(
    "invalid_timestamp",
    "normalize",
    "The event time is not an epoch number, digit string, $D_ date or ISO-8601 form.",
)
WRONG_TYPE = Reason(
    "wrong_type", "normalize", "A field has the wrong JSON type; the code names it, as wrong_type:<field>."
)
ADAPTER_CRASHED = Reason(
    "adapter_crashed",
    "normalize",
    "The adapter raised something other than Reject: a bug in Headwater, not in the input.",
)
VALIDATION_FAILED = Reason(
    "validation_failed",
    "validate",
    "The canonical event model rejected the adapter's output; see the field errors.",
)
INVALID_RAW_HEADERS = Reason(
    "invalid_raw_headers", "parse", "The raw record lacks Headwater's headers (not written by the receiver?)."
)
REDRIVE_LIMIT = Reason("redrive_limit", "parse", "The record was redriven too many times and is parked.")
NESTING_TOO_DEEP = Reason(
    "nesting_too_deep",
    "parse",
    "The body nests arrays/objects deeper than the documented limit (128 levels); the whole request is "
    "dead-lettered.",
)
UNSERIALIZABLE_OUTPUT = Reason(
    "unserializable_output",
    "validate",
    "The canonical event could not be written as JSON (a bug in Headwater, not in the input).",
)
OUTPUT_TOO_LARGE = Reason(
    "output_too_large",
    "validate",
    "The canonical event is larger than worker.max_event_bytes; the item is dead-lettered instead.",
)
OUTPUT_REFUSED = Reason(
    "output_refused",
    "validate",
    "Kafka kept refusing this record's outputs while the records around it went through; it is parked.",
)
MORE_FAILED_ITEMS = Reason(
    "more_failed_items",
    "normalize",
    "More items of one request failed than are dead-lettered one by one; this letter counts the rest per "
    "reason and gives their index ranges. A redrive republishes the whole request.",
)

UNKNOWN = Reason(
    "unknown", "normalize", "A reason code this release does not know (written by another version?)."
)

CATALOGUE: dict[str, Reason] = {
    r.code: r
    for r in (
        INVALID_JSON,
        UNEXPECTED_BODY_SHAPE,
        API_KEY_MISMATCH,
        LICENSE_CODE_MISMATCH,
        TEST_PAYLOAD,
        UNSUPPORTED_TYPE,
        MISSING_EVENT_NAME,
        MISSING_USER_IDENTITY,
        INVALID_EVENT_ID,
        MISSING_TIMESTAMP,
        INVALID_TIMESTAMP,
        WRONG_TYPE,
        ADAPTER_CRASHED,
        VALIDATION_FAILED,
        INVALID_RAW_HEADERS,
        REDRIVE_LIMIT,
        NESTING_TOO_DEEP,
        UNSERIALIZABLE_OUTPUT,
        OUTPUT_TOO_LARGE,
        OUTPUT_REFUSED,
        MORE_FAILED_ITEMS,
    )
}


def lookup(code: str) -> Reason:
    """The catalogue entry for a code; wrong_type:<field> maps to wrong_type, unknown codes to UNKNOWN."""
    return CATALOGUE.get(code) or CATALOGUE.get(code.partition(":")[0], UNKNOWN)


# --- rewards.dlq ----------------------------------------------------------------------------------------

REWARD_INVALID_JSON = Reason("invalid_json", "intake", "The record is not JSON (or not UTF-8).")
REWARD_NOT_AN_OBJECT = Reason("not_an_object", "intake", "The record is JSON but not one object.")
REWARD_MISSING_FIELD = Reason(
    "missing_field",
    "intake",
    "campaignId, userId or rewardId is absent, null or blank; the code names it, as missing_field:<field>.",
)
REWARD_WRONG_TYPE = Reason("wrong_type", "intake", "A field has the wrong JSON type (wrong_type:<field>).")
REWARD_INVALID_ID = Reason(
    "invalid_id",
    "intake",
    "rewardId is over 256 characters or not printable ASCII: "
    "it travels in the X-Reward-Id header (invalid_id:rewardId).",
)
REWARD_MISSING_TENANT = Reason("missing_tenant", "intake", "The Kafka record has no hw-tenant header.")
REWARD_UNKNOWN_TENANT = Reason("unknown_tenant", "intake", "The hw-tenant header names no configured tenant.")
REWARD_NO_WEBHOOK = Reason("no_webhook", "intake", "The tenant has no rewards_webhook configured.")
REWARD_TOO_LARGE = Reason(
    "too_large",
    "intake",
    "The record, or the delivery job built from it, is over the reward size limit (256 KiB); "
    "the dead letter keeps the first 256 KiB, the whole record stays at its origin.",
)
REWARD_TOO_DEEP = Reason(
    "too_deep", "intake", "The reward nests objects or arrays deeper than 64 levels (e.g. in details)."
)
REWARD_INVALID_HEADER = Reason(
    "invalid_header",
    "intake",
    "A Headwater header of the record is unreadable (invalid_header:<name>, e.g. hw-redrive-count).",
)
REWARD_INTAKE_CRASHED = Reason(
    "intake_crashed",
    "intake",
    "Reading the record raised an unexpected error (a bug, logged with its traceback); the record is kept.",
)
REWARD_REJECTED = Reason(
    "rejected",
    "delivery",
    "The endpoint answered a status that is not retried "
    "(4xx other than 408 and 429, or 3xx); no further attempts.",
)
REWARD_ENDPOINT_GONE = Reason(
    "endpoint_gone",
    "delivery",
    "The tenant's endpoint answered 410 Gone: the dispatcher stops calling it until it restarts.",
)
REWARD_ATTEMPTS_EXHAUSTED = Reason(
    "attempts_exhausted", "delivery", "Every attempt of the retry schedule failed."
)

REWARD_CATALOGUE: dict[str, Reason] = {
    r.code: r
    for r in (
        REWARD_INVALID_JSON,
        REWARD_NOT_AN_OBJECT,
        REWARD_MISSING_FIELD,
        REWARD_WRONG_TYPE,
        REWARD_INVALID_ID,
        REWARD_MISSING_TENANT,
        REWARD_UNKNOWN_TENANT,
        REWARD_NO_WEBHOOK,
        REWARD_TOO_LARGE,
        REWARD_TOO_DEEP,
        REWARD_INVALID_HEADER,
        REWARD_INTAKE_CRASHED,
        REWARD_REJECTED,
        REWARD_ENDPOINT_GONE,
        REWARD_ATTEMPTS_EXHAUSTED,
    )
}

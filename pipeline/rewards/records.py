"""Reward records (docs/sources.md §5): intake validation, the retry policy, and what crosses topics.

Pure: no I/O, no clock of its own. rewards.outbound -> (validate, once) -> DeliveryJob on rewards.deliveries
-> AttemptOutcome records on the same topic -> delivered, or a RewardDeadLetter on rewards.dlq. The
delivery stage's table holds a DeliveryState per (tenant, rewardId); its changelog holds the same records.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from pipeline import reasons
from pipeline.reasons import Reason
from pipeline.records import Processor, UtcDatetime
from pipeline.signing import canonical_body

REQUIRED = ("campaignId", "userId", "rewardId")
OPTIONAL_STRINGS = ("type", "rewardName", "code")
MAX_ID_CHARS = 256
MAX_REWARD_BYTES = 256 * 1024  # record and job; the state value and the dead letter then fit Kafka's 1 MB
MAX_DEPTH = 64  # nesting of objects and arrays; the signing encoder recurses, orjson writes only 254 deep
MAX_TENANT_CHARS = 128  # as config's tenant ids: a longer hw-tenant header names no tenant anyway


class RewardRejected(Exception):  # noqa: N818 - a verdict, not an error (like adapting.Reject)
    """A verdict on input, not a bug: the record becomes a rewards.dlq dead letter with `reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.code}: {detail}")
        self.reason = reason
        self.detail = detail


# --- intake validation ------------------------------------------------------------------------------


def parse_reward(body: bytes) -> dict[str, Any]:
    """Bytes of one rewards.outbound record -> the reward object, or RewardRejected."""
    if len(body) > MAX_REWARD_BYTES:
        raise RewardRejected(
            reasons.REWARD_TOO_LARGE, f"the record is {len(body)} bytes; the limit is {MAX_REWARD_BYTES}"
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RewardRejected(reasons.REWARD_INVALID_JSON, f"not JSON: {exc}") from None
    if _depth_over(doc, MAX_DEPTH):
        raise RewardRejected(reasons.REWARD_TOO_DEEP, f"nested deeper than {MAX_DEPTH} levels")
    return validate_reward(doc)


def _depth_over(doc: object, limit: int) -> bool:
    """Does `doc` nest objects/arrays deeper than `limit`? Iterative: a hostile depth cannot recurse."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def validate_reward(doc: object) -> dict[str, Any]:
    """Check one reward object; optional fields that are null are dropped (null means absent).

    Only campaignId, userId and rewardId are required. Fields outside docs/sources.md §5 are kept:
    the upstream system decides what the customer receives.
    """
    if not isinstance(doc, dict):
        raise RewardRejected(reasons.REWARD_NOT_AN_OBJECT, f"expected one JSON object, got {_kind(doc)}")
    for field in REQUIRED:
        value = doc.get(field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RewardRejected(reasons.REWARD_MISSING_FIELD.about(field), f"{field} is required")
        if not isinstance(value, str):
            raise RewardRejected(
                reasons.REWARD_WRONG_TYPE.about(field), f"{field} must be a string, got {_kind(value)}"
            )
    reward_id: str = doc["rewardId"]
    if len(reward_id) > MAX_ID_CHARS or not all("!" <= c <= "~" for c in reward_id):
        raise RewardRejected(
            reasons.REWARD_INVALID_ID.about("rewardId"), "rewardId must be 1-256 printable ASCII characters"
        )
    for field in OPTIONAL_STRINGS:
        if doc.get(field) is not None and not isinstance(doc[field], str):
            raise RewardRejected(
                reasons.REWARD_WRONG_TYPE.about(field), f"{field} must be a string, got {_kind(doc[field])}"
            )
    amount = doc.get("rewardAmount")
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int | float)):
        raise RewardRejected(
            reasons.REWARD_WRONG_TYPE.about("rewardAmount"),
            f"rewardAmount must be a number, got {_kind(amount)}",
        )
    if doc.get("details") is not None and not isinstance(doc["details"], dict):
        raise RewardRejected(
            reasons.REWARD_WRONG_TYPE.about("details"),
            f"details must be an object, got {_kind(doc['details'])}",
        )
    return {
        k: v
        for k, v in doc.items()
        if v is not None or k not in (*OPTIONAL_STRINGS, "rewardAmount", "details")
    }


def read_intake(
    body: bytes, headers: Mapping[str, str], webhooks: Mapping[str, bool], origin: str, now: datetime
) -> DeliveryJob | RewardDeadLetter:
    """One rewards.outbound record -> its delivery job, or its dead letter when RewardRejected says why.

    `webhooks` maps each configured tenant to whether it has a rewards_webhook. Any other exception is a
    bug here: the caller turns it into an intake_crashed dead letter (intake_dead_letter), so no record
    is acknowledged without an outcome.
    """
    tenant = headers.get("hw-tenant") or None
    reward_id: str | None = None
    redelivery = 0
    try:
        if tenant is None:
            raise RewardRejected(reasons.REWARD_MISSING_TENANT, "the record has no hw-tenant header")
        if tenant not in webhooks:
            shown = tenant[:MAX_TENANT_CHARS]
            raise RewardRejected(reasons.REWARD_UNKNOWN_TENANT, f"tenant {shown!r} is not configured")
        redelivery = _redrive_count(headers.get("hw-redrive-count"))
        reward = parse_reward(body)
        reward_id = reward["rewardId"]
        if not webhooks[tenant]:
            raise RewardRejected(reasons.REWARD_NO_WEBHOOK, f"tenant {tenant!r} has no rewards_webhook")
        canonical = canonical_body(reward)
        if len(canonical) > MAX_REWARD_BYTES:  # the signing encoder may spell a character longer
            raise RewardRejected(
                reasons.REWARD_TOO_LARGE,
                f"the body to send is {len(canonical)} bytes; the limit is {MAX_REWARD_BYTES}",
            )
        return DeliveryJob(
            tenant=tenant,
            reward_id=reward["rewardId"],
            body=canonical,
            origin=origin,
            redelivery_count=redelivery,
            enqueued_at=now,
        )
    except RewardRejected as rejected:
        return intake_dead_letter(body, tenant, reward_id, rejected, origin, redelivery, now)


def intake_dead_letter(
    body: bytes,
    tenant: str | None,
    reward_id: str | None,
    rejected: RewardRejected,
    origin: str,
    redelivery: int,
    now: datetime,
) -> RewardDeadLetter:
    """The intake dead letter of one record; an oversize body is cut (the record stays at `origin`)."""
    kept = body[:MAX_REWARD_BYTES]
    return RewardDeadLetter(
        id=RewardDeadLetter.make_id(origin, "intake"),
        stage="intake",
        reason=rejected.reason.code,
        message=rejected.detail[:1000],
        tenant=tenant[:MAX_TENANT_CHARS] if tenant else None,
        reward_id=reward_id or peek_reward_id(kept),
        origin=origin,
        body_b64=b64(kept),
        failed_at=now,
        redelivery_count=redelivery,
        original_bytes=len(body) if len(kept) < len(body) else None,
    )


def _redrive_count(value: str | None) -> int:
    if not value:
        return 0
    if not (value.isascii() and value.isdigit() and len(value) <= 9):
        raise RewardRejected(
            reasons.REWARD_INVALID_HEADER.about("hw-redrive-count"),
            f"hw-redrive-count must be a non-negative integer, got {value[:40]!r}",
        )
    return int(value)


def peek_reward_id(body: bytes) -> str | None:
    """The rewardId of a record that failed validation, when it has a usable one (for the dead letter)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("rewardId") if isinstance(doc, dict) else None
    return value[:MAX_ID_CHARS] if isinstance(value, str) and value else None


def split_rewards(body: bytes) -> tuple[list[bytes], list[dict[str, Any]]]:
    """A POST /rewards/v1 body -> one record per reward, plus the items intake will dead-letter (and why).

    One object is kept byte for byte; an array is split, each element re-encoded. A body that is not
    JSON is kept whole: intake dead-letters it as invalid_json, so nothing a sender posted is lost.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [body], [{"index": None, "reason": reasons.REWARD_INVALID_JSON.code}]
    items = list(enumerate(doc)) if isinstance(doc, list) else [(None, doc)]
    records = [body] if not isinstance(doc, list) else [orjson.dumps(item) for _, item in items]
    invalid: list[dict[str, Any]] = []
    for index, item in items:
        try:
            validate_reward(item)
        except RewardRejected as rejected:
            invalid.append({"index": index, "reason": rejected.reason.code})
    return records, invalid


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def delivery_key(tenant: str, reward_id: str) -> bytes:
    """Key on rewards.deliveries and in the state table. Tenant ids contain no '/'."""
    return f"{tenant}/{reward_id}".encode()


# --- retry policy ---------------------------------------------------------------------------------------

Verdict = Literal["delivered", "retry", "reject"]
RETRIED_4XX = frozenset({408, 429})


def classify(status: int | None) -> Verdict:
    """2xx delivered; 5xx, 408, 429 and no answer (status None: timeout, connection error) retried."""
    if status is None or status >= 500 or status in RETRIED_4XX:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "reject"


def retry_delay_s(
    attempts_made: int,
    delays_s: tuple[float, ...],
    jitter: float,
    retry_after_s: float | None,
    max_retry_after_s: float,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds until the next attempt, or None when the schedule is used up.

    The schedule entry is scaled by uniform(1 - jitter, 1 + jitter) so that a burst of failures does not
    retry in lockstep; a receiver's Retry-After raises the delay (never lowers it), capped.
    """
    if attempts_made > len(delays_s):
        return None
    base = delays_s[attempts_made - 1] * (rng or random).uniform(1 - jitter, 1 + jitter)
    if retry_after_s is not None:
        base = max(base, min(retry_after_s, max_retry_after_s))
    return base


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as delta-seconds or an HTTP date -> seconds from now (None when absent or unreadable)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# --- records that cross topics ---------------------------------------------------------------------------


class _Kind(BaseModel):
    kind: Literal["job", "outcome"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))


class Attempt(_Record):
    """One HTTP attempt (or one skipped by an open breaker: status None, error 'circuit open')."""

    number: int
    at: UtcDatetime
    status: int | None = None
    latency_ms: float = 0.0
    error: str | None = None
    retry_after_s: float | None = None


class _Framed(_Record):
    """A record whose reward body travels as its exact bytes after the JSON of the other fields:
    `<fields as JSON>\\n<body>` (orjson never writes a raw newline). The body is neither escaped into the
    JSON nor parsed again: intake validated it once, and every attempt sends these bytes."""

    body: bytes | None = Field(default=None, exclude=True)

    def to_record(self) -> bytes:
        return self.to_json() + b"\n" + (self.body or b"")

    @classmethod
    def from_record(cls, value: bytes) -> Self:
        head, _, body = value.partition(b"\n")
        record = cls.model_validate_json(head)
        return record.model_copy(update={"body": body or None})


class DeliveryJob(_Framed):
    """A valid reward, re-keyed by (tenant, rewardId); `body` is the exact bytes every attempt sends."""

    kind: Literal["job"] = "job"
    tenant: str
    reward_id: str
    origin: str  # topic:partition:offset of the rewards.outbound record
    redelivery_count: int = 0
    enqueued_at: UtcDatetime


class AttemptOutcome(_Record):
    """What one attempt ended in: the attempt log on rewards.deliveries, applied by the delivery stage."""

    kind: Literal["outcome"] = "outcome"
    tenant: str
    reward_id: str
    attempt: Attempt
    verdict: Verdict

    def to_record(self) -> bytes:
        return self.to_json()


_KIND = TypeAdapter(Annotated[_Kind, Field(discriminator="kind")])


def parse_message(value: bytes) -> DeliveryJob | AttemptOutcome:
    """A rewards.deliveries record: a job (fields, then the body's bytes) or an attempt outcome."""
    head, newline, _ = value.partition(b"\n")
    kind = _KIND.validate_json(head).kind
    if kind == "job":
        return DeliveryJob.from_record(value)
    if newline:
        raise ValueError("an attempt outcome carries no body")
    return AttemptOutcome.model_validate_json(head)


class DeliveryState(_Framed):
    """The state table's value for one (tenant, rewardId): the durable retry queue and the dedup marker.

    `pending` carries the body, the attempts so far and when the next one is due (epoch seconds);
    `delivered` keeps only what dedup and expiry need. `partition` is the rewards.deliveries partition
    that owns the key, so outcomes go back to it and recovery can rebuild the schedule per partition.
    """

    status: Literal["pending", "delivered"]
    tenant: str
    reward_id: str
    partition: int
    origin: str
    attempts: tuple[Attempt, ...] = ()
    attempts_made: int = 0  # kept when `attempts` is dropped from a delivered marker
    due_at: float | None = None
    first_seen_at: UtcDatetime
    finished_at: UtcDatetime | None = None
    redelivery_count: int = 0
    duplicates: int = 0


class RewardDeadLetter(_Record):
    """A reward that was not (or cannot be) delivered: reason, every attempt, and the exact bytes."""

    id: str
    stage: Literal["intake", "delivery"]
    reason: str
    message: str
    tenant: str | None = None
    reward_id: str | None = None
    origin: str
    body_b64: str
    attempts: tuple[Attempt, ...] = ()
    failed_at: UtcDatetime
    redelivery_count: int = 0
    original_bytes: int | None = None  # set when body_b64 holds only the first MAX_REWARD_BYTES
    processor: Processor = Processor()

    @staticmethod
    def make_id(origin: str, stage: str) -> str:
        """Deterministic: reprocessing the same input record after a crash gives the same id."""
        return "rdl_" + hashlib.sha256(f"{origin}\x00{stage}".encode()).hexdigest()[:24]

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)

    @classmethod
    def from_json(cls, data: bytes) -> Self:
        return cls.model_validate_json(data)


def b64(body: bytes) -> str:
    return base64.b64encode(body).decode("ascii")

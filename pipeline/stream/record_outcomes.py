"""The pure driver: one raw record + its adapter -> canonical events and dead letters, in request order.

No record ever comes out as nothing: a Reject from `parse` is one dead letter for the
whole body, a Reject from `normalize` one dead letter for that element (with its index in a batch),
and any other exception is an adapter bug that is logged and still dead-lettered (`adapter_crashed`).
A raw record redriven more often than the redrive limit is parked as one `redrive_limit` dead letter
before its adapter sees it, so a record that keeps failing cannot circle through the DLQ forever.
Validation runs here too, before dedup: an invalid event is never marked seen, so validating first
or after dedup emits exactly the same records, and the dead letter can still carry the original bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from pipeline import reasons
from pipeline.adapting import AdapterModule, Draft, Reject
from pipeline.config import DEFAULT_REDRIVE_LIMIT
from pipeline.fingerprint import fingerprint
from pipeline.reasons import Reason
from pipeline.records import (
    CanonicalEvent,
    DeadLetter,
    FieldError,
    Origin,
    RawRecord,
    Stage,
    encode_body,
    utc_now,
)

log = logging.getLogger(__name__)

Outcome = CanonicalEvent | DeadLetter


def outcomes(
    raw: RawRecord, adapter: AdapterModule, redrive_limit: int = DEFAULT_REDRIVE_LIMIT
) -> Iterator[Outcome]:
    """Every canonical event and dead letter one raw record yields, in the order of its items.

    `redrive_limit` is `settings.dlq.redrive_limit`: a record whose hw-redrive-count exceeds it
    becomes a single `redrive_limit` dead letter instead of being normalized again. The record's first
    dead letter carries its body; the later ones point to it (DeadLetter.body_ref), so the body is
    encoded and stored once whatever the number of failed items.
    """
    count = raw.headers.redrive_count
    if count > redrive_limit:
        yield dead_letter(
            raw,
            "parse",
            reasons.REDRIVE_LIMIT,
            f"redriven {count} times, more than the limit of {redrive_limit}; parked "
            "(fix the cause, then `headwater dlq redrive --reset-count`)",
        )
        return
    try:
        records = adapter.parse(raw.body, raw.headers)
    except Reject as rejection:
        yield dead_letter(raw, "parse", rejection.reason, rejection.detail, _errors(rejection))
        return
    except Exception as exc:  # noqa: BLE001 - an adapter bug must not lose the record
        log.exception("adapter %s crashed in parse", adapter.SOURCE)
        yield dead_letter(raw, "parse", reasons.ADAPTER_CRASHED, f"{type(exc).__name__}: {exc}")
        return
    carrier: str | None = None  # the id of this record's first dead letter, which carries the body
    for index, record in enumerate(records):
        position = index if adapter.BATCHED else None
        outcome = _item_outcome(raw, adapter, record, position, carrier)
        if carrier is None and isinstance(outcome, DeadLetter):
            carrier = outcome.id
        yield outcome


def _item_outcome(
    raw: RawRecord, adapter: AdapterModule, record: Any, position: int | None, carrier: str | None
) -> Outcome:
    """One item of a parsed body: its canonical event or its dead letter."""
    try:
        draft = adapter.normalize(record, raw.headers)
    except Reject as rejection:
        return dead_letter(
            raw,
            "normalize",
            rejection.reason,
            rejection.detail,
            _errors(rejection),
            element=record,
            index=position,
            body_ref=carrier,
        )
    except Exception as exc:  # noqa: BLE001
        log.exception("adapter %s crashed in normalize", adapter.SOURCE)
        return dead_letter(
            raw,
            "normalize",
            reasons.ADAPTER_CRASHED,
            f"{type(exc).__name__}: {exc}",
            element=record,
            index=position,
            body_ref=carrier,
        )
    return validate(raw, canonical_fields(raw, draft), element=record, index=position, body_ref=carrier)


def canonical_fields(raw: RawRecord, draft: Draft) -> dict[str, Any]:
    """Complete a draft with tenant, source, received_at, the time fallback and the event id (§2, §3.5)."""
    headers = raw.headers
    timestamp: datetime = draft.timestamp or headers.received_at
    context = draft.context
    if draft.timestamp is None:
        context = {**context, "timestamp_source": "received_at"}
    event_id = draft.vendor_event_id
    if event_id is None:
        event_id = fingerprint(
            tenant=headers.tenant,
            source=headers.source,
            event_name=draft.event_name,
            user_id=draft.user_id,
            anonymous_id=draft.anonymous_id,
            timestamp=draft.timestamp,
            properties=draft.properties,
            extra=draft.fingerprint_extra,
        )
    return {
        "event_id": event_id,
        "event_id_derived": draft.vendor_event_id is None,
        "event_name": draft.event_name,
        "tenant": headers.tenant,
        "source": headers.source,
        "user_id": draft.user_id,
        "anonymous_id": draft.anonymous_id,
        "timestamp": timestamp,
        "received_at": headers.received_at,
        "properties": draft.properties,
        "user_traits": draft.user_traits,
        "context": context,
        "schema_version": 1,
    }


def validate(
    raw: RawRecord,
    fields: dict[str, Any],
    element: Any = None,
    index: int | None = None,
    body_ref: str | None = None,
) -> Outcome:
    """The canonical model's verdict: the event, or a dead letter listing every error by field path."""
    try:
        return CanonicalEvent.of(fields)
    except ValidationError as exc:
        errors = tuple(
            FieldError(path=".".join(str(p) for p in error["loc"]) or "event", message=error["msg"])
            for error in exc.errors()
        )
        summary = "; ".join(f"{e.path}: {e.message}" for e in errors)
        return dead_letter(
            raw,
            "validate",
            reasons.VALIDATION_FAILED,
            summary,
            errors,
            element=element,
            index=index,
            body_ref=body_ref,
        )


def dead_letter(
    raw: RawRecord,
    stage: Stage,
    reason: Reason,
    detail: str,
    errors: tuple[FieldError, ...] = (),
    element: Any = None,
    index: int | None = None,
    body_ref: str | None = None,
) -> DeadLetter:
    """A dead letter that explains itself and keeps the exact original bytes, or with `body_ref` the
    id of the dead letter of the same raw record that keeps them."""
    origin = raw.origin or Origin(topic="", partition=-1, offset=-1)
    capped, truncated = DeadLetter.capped_element(element)
    return DeadLetter(
        id=DeadLetter.make_id(origin, index),
        stage=stage,
        reason=reason.code,
        message=DeadLetter.capped_text(detail or reason.summary),
        errors=tuple(
            e.model_copy(update={"message": DeadLetter.capped_text(e.message)}) for e in errors[:50]
        ),
        tenant=raw.headers.tenant,
        source=raw.headers.source,
        origin=origin,
        headers=raw.headers.json_headers(),
        body_b64=encode_body(raw.body) if body_ref is None else None,
        body_ref=body_ref,
        element=capped,
        element_truncated=truncated,
        index=index,
        failed_at=utc_now(),
        redrive_count=raw.headers.redrive_count,
    )


def refused_event_letter(keyed: Origin, index: int, event: bytes, detail: str) -> DeadLetter:
    """The dead letter of a canonical event the dedup stage could not write (output_refused).

    Its body is the event's JSON (the dedup stage never sees the request), its origin the keyed record, and
    `dlq redrive` sends it back to the keyed topic: the dedup rules decide again, and since a refused event
    was never marked seen, it comes out once."""
    fields = orjson.loads(event)
    return DeadLetter(
        id=DeadLetter.make_id(keyed, index),
        stage="validate",
        reason=reasons.OUTPUT_REFUSED.code,
        message=DeadLetter.capped_text(detail),
        tenant=str(fields.get("tenant") or ""),
        source=str(fields.get("source") or ""),
        origin=keyed,
        headers={},
        body_b64=encode_body(event),
        index=index,
        failed_at=utc_now(),
        worker_stage="dedup",
        redrive_to="keyed",
    )


def _errors(rejection: Reject) -> tuple[FieldError, ...]:
    path = rejection.path or rejection.reason.code.partition(":")[2] or None
    return (FieldError(path=path, message=rejection.detail),) if path else ()

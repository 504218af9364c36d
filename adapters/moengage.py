"""MoEngage Streams (POST /v3/moengage) -> canonical drafts.

Always a bulk call: an envelope (app_name, source, moe_request_id) around an `events` array
(docs/sources.md §4.3). Each element becomes one record that also carries the envelope.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "moengage"
BATCHED = True
ROUTES = ("/v3/moengage",)
AUTH: AuthScheme = "write_key"
REQUEST_META: Mapping[str, RequestValue] = {}
ENVELOPE_CONTEXT = ("app_name", "moe_request_id", "source")
EVENT_CONTEXT = ("push_id", "event_code", "event_type", "event_source")
# user_attributes gain these top-level fields when they do not set them already.
TRAIT_ALIASES = (("email_id", "email"), ("mobile_number", "phone"))
MAPPED = frozenset(
    {
        "event_name",
        "event_uuid",
        "uid",
        "event_time",
        "event_attributes",
        "user_attributes",
        "device_attributes",
    }
    | {alias for alias, _ in TRAIT_ALIASES}
    | set(EVENT_CONTEXT)
)


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """One record per element of `events`, each paired with the envelope: {"envelope", "event"}."""
    doc = read.as_object(read.json_body(body), "the body")
    events = doc.get("events")
    if not isinstance(events, list):
        reject(
            reasons.UNEXPECTED_BODY_SHAPE, f"events must be an array, got {read.kind(events)}", path="events"
        )
    envelope = read.leftovers(doc, {"events"})
    return [{"envelope": envelope, "event": event} for event in events]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one Streams event onto the canonical fields (§4.3), in the check order of §3.6."""
    pair = read.as_object(record, "a MoEngage record")
    envelope = read.as_object(pair.get("envelope"), "the MoEngage envelope")
    event = read.as_object(pair.get("event"), "an element of events")
    # The display name first, the code (MOE_EMAIL_OPEN) when there is none.
    name = read.event_name(event, "event_name", "event_code")
    user_id = read.identifier(event, "uid")
    # Only present when the moengage_device_id attribute is exported (§6.4 Decision).
    anonymous_id = read.identifier(event, "device_attributes.moengage_device_id")
    if user_id is None and anonymous_id is None:
        reject(
            reasons.MISSING_USER_IDENTITY,
            "neither uid nor device_attributes.moengage_device_id is present",
            path="uid",
        )
    vendor_id = read.event_id(event, "event_uuid")
    # Documented as "epoch"; real payloads use seconds, the magnitude rule also takes milliseconds.
    when = read.timestamp(event, "event_time", required=True)
    properties = read.container(event, "event_attributes")
    traits = read.container(event, "user_attributes")
    device = read.container(event, "device_attributes")
    for alias, trait in TRAIT_ALIASES:
        if trait not in traits and event.get(alias) is not None:
            traits[trait] = event[alias]
    context = {key: event[key] for key in EVENT_CONTEXT if key in event}
    context.update({key: envelope[key] for key in ENVELOPE_CONTEXT if key in envelope})
    context["device_attributes"] = device
    context["vendor"] = {**read.leftovers(envelope, ENVELOPE_CONTEXT), **read.leftovers(event, MAPPED)}
    return Draft(
        event_name=name,
        user_id=user_id,
        anonymous_id=anonymous_id,
        vendor_event_id=vendor_id,
        timestamp=when,
        properties=properties,
        user_traits=traits,
        context=context,
        fingerprint_extra=None,
    )

"""Segment Webhooks (Actions) destination (POST /segment/v4) -> canonical drafts.

The body is one Segment message or, with batching enabled, an array of them; each element is
independent (docs/sources.md §4.2).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, JSONValue, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "segment"
BATCHED = True
ROUTES = ("/segment/v4",)
AUTH: AuthScheme = "segment_write_key"
REQUEST_META: Mapping[str, RequestValue] = {}
TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
# Message fields that land in canonical fields; everything else top-level goes to context.vendor
# (channel, integrations, sentAt, receivedAt, originalTimestamp, version, ...).
MAPPED = frozenset(
    {"type", "event", "messageId", "userId", "anonymousId", "timestamp", "properties", "context"}
)
MAPPED_BY_TYPE = {
    "track": frozenset(),
    "identify": frozenset({"traits"}),
    "page": frozenset({"name", "category"}),
    "screen": frozenset({"name", "category"}),
    "group": frozenset({"groupId", "traits"}),
    "alias": frozenset({"previousId"}),
}


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """One message, or a batch of them; element shapes are checked per element in normalize."""
    doc = read.json_body(body)
    if isinstance(doc, list):
        return doc
    return [read.as_object(doc, "the body")]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one Segment message onto the canonical fields (§4.2), in the check order of §3.6."""
    message = read.as_object(record, "a Segment message")
    call = _call_type(message)
    name = read.event_name(message, "event") if call == "track" else call
    user_id = read.identifier(message, "userId")
    anonymous_id = read.identifier(message, "anonymousId")
    if user_id is None and anonymous_id is None:
        reject(reasons.MISSING_USER_IDENTITY, "neither userId nor anonymousId is present", path="userId")
    vendor_id = read.event_id(message, "messageId")
    # `timestamp` is Segment's skew-corrected time, so it comes first.
    when = read.timestamp(message, "timestamp", "originalTimestamp", "sentAt", "receivedAt", required=True)
    context = read.container(message, "context")
    context_traits = read.container(message, "context.traits")
    context.pop("traits", None)
    properties, user_traits = _properties_and_traits(message, call, context_traits)
    context["vendor"] = read.leftovers(message, MAPPED | MAPPED_BY_TYPE[call])
    return Draft(
        event_name=name,
        user_id=user_id,
        anonymous_id=anonymous_id,
        vendor_event_id=vendor_id,
        timestamp=when,
        properties=properties,
        user_traits=user_traits,
        context=context,
        fingerprint_extra=None,
    )


def _call_type(message: dict[str, JSONValue]) -> str:
    """The message type; a message without one is a track call when it names an event (§4.2)."""
    call = message.get("type")
    if call is None:
        if message.get("event") is None:
            reject(reasons.UNSUPPORTED_TYPE, "the message has neither a type nor an event", path="type")
        return "track"
    if not isinstance(call, str) or call not in TYPES:
        reject(
            reasons.UNSUPPORTED_TYPE, f"type {call!r} is not one of {', '.join(sorted(TYPES))}", path="type"
        )
    return call


def _properties_and_traits(
    message: dict[str, JSONValue], call: str, context_traits: dict[str, JSONValue]
) -> tuple[dict[str, JSONValue], dict[str, JSONValue]]:
    """Per-call properties and user traits (§4.2 table)."""
    if call in ("track", "page", "screen"):
        properties = read.container(message, "properties")
        if call != "track":
            for key in ("name", "category"):
                if key not in properties and message.get(key) is not None:
                    properties[key] = message[key]
        return properties, context_traits
    if call == "identify":
        return {}, {**context_traits, **read.container(message, "traits")}
    if call == "group":
        return {"groupId": message.get("groupId"), **read.container(message, "traits")}, context_traits
    return {"previousId": message.get("previousId")}, context_traits

"""WebEngage event webhooks (POST /webengage/v4) -> canonical drafts.

One event per request. The event id is the request's x-request-id header and the integrity
check uses the licenseCode query value; the receiver stores both in the raw headers (docs/sources.md §4.6).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, Header, Query, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "webengage"
BATCHED = False
ROUTES = ("/webengage/v4",)
AUTH: AuthScheme = "webengage_license"
REQUEST_META: Mapping[str, RequestValue] = {
    "request_id": Header("x-request-id"),
    "event_type": Query("eventType"),
    "license_code": Query("licenseCode"),
}
CONTEXT = ("system_data", "category", "license_code")
MAPPED = frozenset({"event_name", "user_id", "anonymous_id", "event_time", "event_data"} | set(CONTEXT))


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """The body is the event; WebEngage sends one event per request."""
    return [read.as_object(read.json_body(body), "the body")]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one WebEngage event onto the canonical fields (§4.6), in the check order of §3.6."""
    event = read.as_object(record, "the body")
    body_license = event.get("license_code")
    license_code = meta.vendor.get("license_code")
    if body_license is not None and body_license != license_code:
        reject(
            reasons.LICENSE_CODE_MISMATCH,
            f"body license_code {body_license!r} is not the licenseCode {license_code!r}",
            path="license_code",
        )
    # The eventType query value is deliberately not a fallback for the name (§4.6).
    name = read.event_name(event, "event_name")
    user_id = read.identifier(event, "user_id")
    anonymous_id = read.identifier(event, "anonymous_id")
    if user_id is None and anonymous_id is None:
        reject(reasons.MISSING_USER_IDENTITY, "neither user_id nor anonymous_id is present", path="user_id")
    # x-request-id is documented "for idempotency"; if retries carry fresh ids, fingerprint instead (§6.8).
    # The header goes through the same §3.1 rules as a body id (trimmed, blank is absent, 256 chars).
    vendor_id = read.event_id({"x-request-id": meta.vendor.get("request_id")}, "x-request-id")
    when = read.timestamp(event, "event_time", required=True)
    properties = read.container(event, "event_data")
    # system_data is copied verbatim: push_notification_content stays the JSON string it is.
    context = {key: event[key] for key in CONTEXT if key in event}
    event_type = meta.vendor.get("event_type")
    if event_type is not None:
        context["eventType"] = event_type
    context["vendor"] = read.leftovers(event, MAPPED)
    return Draft(
        event_name=name,
        user_id=user_id,
        anonymous_id=anonymous_id,
        vendor_event_id=vendor_id,
        timestamp=when,
        properties=properties,
        user_traits={},
        context=context,
        fingerprint_extra={"license_code": license_code},
    )

"""Amplitude Webhook event streaming (POST /amplitude/v4) -> canonical drafts.

One event per request, in Amplitude's export format, or a custom template that keeps those
field names (docs/sources.md §4.4).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "amplitude"
BATCHED = False
ROUTES = ("/amplitude/v4",)
AUTH: AuthScheme = "write_key"
REQUEST_META: Mapping[str, RequestValue] = {}
CONTEXT = (
    "platform", "os_name", "os_version",
    "device_brand", "device_manufacturer", "device_model", "device_family", "device_type", "device_carrier",
    "country", "region", "city", "dma", "location_lat", "location_lng", "ip_address", "language",
    "library", "version_name", "session_id", "amplitude_id", "groups", "group_properties",
    "client_event_time", "client_upload_time", "server_received_time", "server_upload_time",
)  # fmt: skip
# Amplitude's integer `event_id` is deliberately not mapped: it is a counter, not unique (§4.4).
MAPPED = frozenset(
    {"$insert_id", "insert_id", "uuid", "event_type", "user_id", "device_id", "event_time", "time"}
    | {"event_properties", "user_properties"}
    | set(CONTEXT)
)


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """The body is the event; Amplitude delivers one event per request."""
    return [read.as_object(read.json_body(body), "the body")]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one Amplitude event onto the canonical fields (§4.4), in the check order of §3.6."""
    event = read.as_object(record, "the body")
    # "Send Users" payloads have no event_type and end here as missing_event_name (§6.6).
    name = read.event_name(event, "event_type")
    user_id = read.identifier(event, "user_id")
    anonymous_id = read.identifier(event, "device_id")
    if user_id is None and anonymous_id is None:
        reject(reasons.MISSING_USER_IDENTITY, "neither user_id nor device_id is present", path="user_id")
    # The producer's dedupe key (export and HTTP-API spellings), then Amplitude's row id (§6.5 Decision).
    vendor_id = read.event_id(event, "$insert_id", "insert_id", "uuid")
    # Default format is "YYYY-MM-DD HH:MM:SS.ffffff" with no zone, i.e. UTC; templates may send epoch ms.
    when = read.timestamp(event, "event_time", "time", "client_event_time", required=True)
    properties = read.container(event, "event_properties")
    traits = read.container(event, "user_properties")
    context = {key: event[key] for key in CONTEXT if key in event}
    context["vendor"] = read.leftovers(event, MAPPED)
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

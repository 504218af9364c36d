"""CustomerGlu server-to-server API v4 (POST /server/v4) -> canonical drafts.

One JSON object per request; there is no batch form (docs/sources.md §4.1).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import AuthScheme, Draft, RawMeta, RequestValue, VendorRecord, reject

SOURCE = "customerglu"
BATCHED = False
ROUTES = ("/server/v4",)
AUTH: AuthScheme = "write_key"
REQUEST_META: Mapping[str, RequestValue] = {}
MAPPED = frozenset({"event_id", "event_name", "user_id", "timestamp", "event_properties"})


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """The body is the record. An array is not a batch here (§4.1 Decision)."""
    return [read.as_object(read.json_body(body), "the body")]


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one record onto the canonical fields (§4.1), in the check order of §3.6."""
    event = read.as_object(record, "the body")
    name = read.event_name(event, "event_name")
    user_id = read.identifier(event, "user_id")
    if user_id is None:
        reject(
            reasons.MISSING_USER_IDENTITY,
            "CustomerGlu v4 requires user_id (it has no anonymous id)",
            path="user_id",
        )
    # Documented as required, but a missing id is derived rather than dead-lettered (§4.1 Decision).
    vendor_id = read.event_id(event, "event_id")
    when = read.timestamp(event, "timestamp", required=True)
    properties = read.container(event, "event_properties")
    return Draft(
        event_name=name,
        user_id=user_id,
        anonymous_id=None,
        vendor_event_id=vendor_id,
        timestamp=when,
        properties=properties,
        user_traits={},
        context={"vendor": {"extra": read.leftovers(event, MAPPED)}},
        fingerprint_extra=None,
    )

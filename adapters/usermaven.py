"""Usermaven HTTP API, Jitsu classic s2s (POST /api/v1/s2s/event) -> canonical drafts.

The body is one event or a bulk array of them (the Python SDK always sends an array); the
receiver keeps the API-key half of the token, and the whole token's digest, for the integrity check
(docs/senders.md).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline import reading as read
from pipeline import reasons
from pipeline.adapting import (
    AuthScheme,
    Draft,
    RawMeta,
    RequestValue,
    VendorRecord,
    credential_digest,
    reject,
)

SOURCE = "usermaven"
BATCHED = True
ROUTES = ("/api/v1/s2s/event",)
AUTH: AuthScheme = "usermaven_token"
REQUEST_META: Mapping[str, RequestValue] = {}
CONTEXT = (
    "company", "ids", "url", "page_title", "doc_path", "doc_host", "doc_search", "referer", "user_agent",
    "user_language", "doc_encoding", "screen_resolution", "vp_size", "source_ip", "src", "utm",
    "cookie_policy", "ip_policy",
)  # fmt: skip
USER_IDS = ("id", "anonymous_id")
# api_key is consumed by the integrity check; the event-id fallbacks are Jitsu classic's spellings.
MAPPED = frozenset(
    {"api_key", "event_id", "eventn_ctx_event_id", "event_type", "user", "_timestamp", "utc_time"}
    | {"event_attributes"}
    | set(CONTEXT)
)


def parse(body: bytes, meta: RawMeta) -> list[VendorRecord]:
    """One event, or a bulk array of them; element shapes are checked per element in normalize."""
    doc = read.json_body(body)
    if isinstance(doc, list):
        return doc
    return [read.as_object(doc, "the body")]


def _is_the_token(api_key: object, meta: RawMeta) -> bool:
    """The body's api_key is the token's API-key half, or the whole API_KEY.SERVER_TOKEN (the JavaScript
    SDK sends its configured key both as ?token= and as api_key); the raw record holds the whole token
    only as its digest."""
    if api_key == meta.vendor.get("api_key"):
        return True
    digest = meta.vendor.get("token_sha256")
    return (
        isinstance(api_key, str)
        and "." in api_key
        and digest is not None
        and (credential_digest(api_key) == digest)
    )


def normalize(record: VendorRecord, meta: RawMeta) -> Draft:
    """Map one Usermaven event onto the canonical fields (§4.7), in the check order of §3.6."""
    event = read.as_object(record, "a Usermaven event")
    api_key = event.get("api_key")
    if api_key not in (None, "") and not _is_the_token(api_key, meta):
        reject(
            reasons.API_KEY_MISMATCH,
            "body api_key is neither the API key of the request's token nor the whole token",
            path="api_key",
        )
    name = read.event_name(event, "event_type")
    user_id = read.identifier(event, "user.id")  # the Python SDK may send an integer
    anonymous_id = read.identifier(event, "user.anonymous_id")
    if user_id is None and anonymous_id is None:
        reject(
            reasons.MISSING_USER_IDENTITY, "neither user.id nor user.anonymous_id is present", path="user.id"
        )
    # Clients send event_id "" and Jitsu would assign a random UUID; we fingerprint so retries collapse.
    vendor_id = read.event_id(event, "event_id", "eventn_ctx.event_id", "eventn_ctx_event_id")
    # Optional (historical imports only); None makes the core fall back to received_at.
    when = read.timestamp(event, "_timestamp", "utc_time", required=False)
    properties = read.container(event, "event_attributes")
    traits = read.leftovers(read.container(event, "user"), USER_IDS)
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

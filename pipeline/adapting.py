"""The contract between the core and an adapter module (one per source, in adapters/).

An adapter is two pure functions: `parse(body, meta) -> [vendor records]` and
`normalize(record, meta) -> Draft`. Either may call `reject(reason, detail)`; the core turns that
into a dead letter (docs/sources.md §3.6). No I/O, no clock, no config inside an adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NoReturn, Protocol

from pipeline.reasons import Reason
from pipeline.records import JSONObject as JSONObject  # re-exported: the adapter contract's JSON types
from pipeline.records import JSONValue as JSONValue
from pipeline.records import RawHeaders

# Vendor JSON (pipeline.records.JSONValue), narrowed only in pipeline.reading.
VendorRecord = JSONValue
RawMeta = RawHeaders


class Reject(Exception):  # noqa: N818 - a verdict, not an error (like faust's Skip)
    """An adapter's verdict on its input: becomes a dead letter with this reason code and detail.

    Not a HeadwaterError: nothing is wrong with the system, the input is wrong.
    """

    def __init__(self, reason: Reason, detail: str, path: str | None = None) -> None:
        super().__init__(f"{reason.code}: {detail}")
        self.reason = reason
        self.detail = detail
        self.path = path


def credential_digest(credential: str) -> str:
    """What a raw record holds of a credential instead of the credential: its SHA-256 (hex). An adapter
    compares a value in the body with it (a body that repeats the whole credential), never with a secret."""
    return hashlib.sha256(credential.encode()).hexdigest()


def reject(reason: Reason, detail: str, path: str | None = None) -> NoReturn:
    """Give the verdict on this input: it becomes a dead letter with this catalogue entry and detail."""
    raise Reject(reason, detail, path)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 2 µs more, once per event
class Draft:
    """One vendor record mapped onto canonical fields, before the core adds tenant/ids/received_at.

    `timestamp=None` means the source legitimately had no time: the core falls back to the
    record's received_at and sets context.timestamp_source = "received_at" (docs/sources.md §2).
    `vendor_event_id=None` means the core derives the fingerprint of §3.5, with `fingerprint_extra`.
    """

    event_name: str
    user_id: str | None
    anonymous_id: str | None
    vendor_event_id: str | None
    timestamp: datetime | None
    properties: JSONObject = field(default_factory=dict)
    user_traits: JSONObject = field(default_factory=dict)
    context: JSONObject = field(default_factory=dict)
    fingerprint_extra: Mapping[str, JSONValue] | None = None


# How the receiver authenticates a source's requests (docs/sources.md §1.1); pipeline.ingest.auth
# implements each.
AuthScheme = Literal[
    "write_key",  # X-API-KEY header = a tenant's write key
    "segment_write_key",  # the same, plus X-Signature over the body when the tenant has a shared secret
    "webengage_license",  # ?licenseCode=...&secret=md5(licenseCode:secret_key)
    "usermaven_token",  # ?token= or X-Auth-Token: API_KEY.SERVER_TOKEN; the API-key half is kept as api_key
]


@dataclass(frozen=True, slots=True)
class Header:
    """A request header the adapter needs, stored in the raw record's vendor metadata."""

    name: str


@dataclass(frozen=True, slots=True)
class Query:
    """A query-string value the adapter needs, stored in the raw record's vendor metadata."""

    name: str


RequestValue = Header | Query


class AdapterModule(Protocol):
    """What adapters/<source>.py exposes; adapters/__init__.py registers them explicitly.

    The module is the one owner of its source's facts: the id, whether a body is a batch, the HTTP
    route(s) the receiver serves for it, how those requests are authenticated, and which request values
    (beyond the body) its `normalize` reads from `meta.vendor`.
    """

    SOURCE: str
    BATCHED: bool
    ROUTES: tuple[str, ...]
    AUTH: AuthScheme
    REQUEST_META: Mapping[str, RequestValue]

    def parse(self, body: bytes, meta: RawMeta) -> list[VendorRecord]: ...

    def normalize(self, record: VendorRecord, meta: RawMeta) -> Draft: ...

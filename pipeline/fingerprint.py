"""The deterministic event id for sources that send none (docs/sources.md §3.5).

A retried request must fingerprint identically, so the material excludes received_at and is
serialized canonically (sorted keys, compact, UTF-8): dedup then collapses vendor retries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

PREFIX = "fp_"


def fingerprint(
    *,
    tenant: str,
    source: str,
    event_name: str,
    user_id: str | None,
    anonymous_id: str | None,
    timestamp: datetime | None,
    properties: Mapping[str, Any],
    extra: Mapping[str, Any] | None,
) -> str:
    """`fp_` + sha256 of the §3.5 material; `timestamp` is None when the time fell back to received_at."""
    material = {
        "tenant": tenant,
        "source": source,
        "event_name": event_name,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "timestamp": None if timestamp is None else format_timestamp(timestamp),
        "properties": dict(properties),
        "extra": None if extra is None else dict(extra),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return PREFIX + hashlib.sha256(blob).hexdigest()


def format_timestamp(moment: datetime) -> str:
    """The §3.5 spelling, `%Y-%m-%dT%H:%M:%S.%fZ` in UTC.

    Formatted by hand: glibc's strftime does not zero-pad years below 1000 and macOS's does, and
    the id must not depend on the platform.
    """
    t = moment.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond:06d}Z"
    )

"""The Kafka headers of a raw record, built per request from a cached template.

RawHeaders owns the header names and encoding; this module asks it once per (tenant, source,
content type, request metadata) for a template and then fills in only the two values that change per
request: the receive time and the request id.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime

from pipeline.records import RawHeaders, UtcClock, format_utc, new_request_id

KafkaHeaderList = list[tuple[str, bytes]]

_TIME_MARK = datetime(1970, 1, 1, tzinfo=UTC)
_ID_MARK = "-request-id-mark-"
_MAX_TEMPLATES = 4096  # content types and metadata come from senders: bound the cache


class HeaderTemplates:
    """(tenant, source, content type, vendor) -> header list with the time and id slots located."""

    def __init__(self) -> None:
        self._templates: dict[tuple[object, ...], tuple[KafkaHeaderList, int, int]] = {}
        self._time_mark = format_utc(_TIME_MARK).encode()
        self._clock = UtcClock()

    def build(
        self, tenant: str, source: str, content_type: str | None, vendor: Mapping[str, str]
    ) -> tuple[str, KafkaHeaderList]:
        """(request id, headers) of one record; every value was checked by the caller (inputs.short_text)."""
        key = (tenant, source, content_type, tuple(vendor.items()) if vendor else ())
        entry = self._templates.get(key)
        if entry is None:
            entry = self._template(tenant, source, content_type, vendor)
        template, time_at, id_at = entry
        now_ns = time.time_ns()
        request_id = new_request_id(now_ns)
        headers = template.copy()
        headers[time_at] = (template[time_at][0], self._clock.text(now_ns))
        headers[id_at] = (template[id_at][0], request_id.encode())
        return request_id, headers

    def _template(
        self, tenant: str, source: str, content_type: str | None, vendor: Mapping[str, str]
    ) -> tuple[KafkaHeaderList, int, int]:
        marked = RawHeaders.model_construct(
            tenant=tenant,
            source=source,
            received_at=_TIME_MARK,
            request_id=_ID_MARK,
            content_type=content_type,
            redrive_count=0,
            replay_of=None,
            vendor=dict(vendor),
        ).to_kafka()
        values = [value for _, value in marked]
        entry = (marked, values.index(self._time_mark), values.index(_ID_MARK.encode()))
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()
        self._templates[(tenant, source, content_type, tuple(vendor.items()) if vendor else ())] = entry
        return entry

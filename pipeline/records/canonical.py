"""The canonical event: the one clean shape every source ends up in, as written to events.canonical."""

from __future__ import annotations

from typing import Annotated, Literal, Self

import orjson
from pydantic import ConfigDict, InstanceOf, StringConstraints, model_validator

from pipeline.clock import json_utc
from pipeline.records.model import JSONObject, Record, ShortText, UtcDatetime


class CanonicalEvent(Record):
    """The one clean shape every source ends up in (docs/architecture.md)."""

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    event_id_derived: bool
    event_name: Annotated[str, StringConstraints(min_length=1, strip_whitespace=False)]
    tenant: ShortText
    source: ShortText
    user_id: str | None
    anonymous_id: str | None
    timestamp: UtcDatetime
    received_at: UtcDatetime
    # The adapter's own dicts, checked to be dicts and kept as they are: validating each key and copying the
    # dict cost ~0.5 us an event, and a key orjson cannot write still becomes its item's dead letter
    # (unserializable_output, when the worker writes the event).
    properties: InstanceOf[JSONObject]
    user_traits: InstanceOf[JSONObject]
    context: InstanceOf[JSONObject]
    schema_version: Literal[1] = 1

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="after")
    def _someone(self) -> Self:
        if self.user_id is None and self.anonymous_id is None:
            raise ValueError("at least one of user_id, anonymous_id is required")
        if not self.event_name.strip():
            raise ValueError("event_name must not be blank")
        return self

    def to_json(self) -> bytes:
        """The event as JSON, fields in declaration order; equal to model_dump(mode="json") serialized,
        without pydantic's per-field serializer calls (the worker's hottest path). The fields are read
        from the instance dict, which pydantic fills in declaration order; the two times are replaced in
        place, so the order holds (and where orjson writes both as they are, the dict is written as it is)."""
        fields = self.__dict__
        timestamp, received_at = json_utc(fields["timestamp"]), json_utc(fields["received_at"])
        if timestamp is fields["timestamp"] and received_at is fields["received_at"]:
            return orjson.dumps(fields)  # orjson writes both times as format_utc does: no copy needed
        return orjson.dumps({**fields, "timestamp": timestamp, "received_at": received_at})

    def dedup_key(self) -> str:
        """The dedup table's key (as UTF-8): dedup is per (tenant, event_id). Tenant ids contain no '/'."""
        return f"{self.tenant}/{self.event_id}"

    def kafka_key(self) -> str:
        """Kafka key on events.canonical (as UTF-8): tenant + user, so one user's events share a partition."""
        who = self.user_id if self.user_id is not None else f"anon:{self.anonymous_id}"
        return f"{self.tenant}/{who}"

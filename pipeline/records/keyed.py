"""The keyed topic's records: packs of canonical candidates for the dedup stage, and replay tags."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from pipeline.records.canonical import CanonicalEvent
from pipeline.records.earlier_formats import tabbed_keyed_entries
from pipeline.records.model import Record


class KeyedBatch:
    """Canonical candidates for one partition of the keyed topic, packed into one Kafka record.

    The dedup stage pays Kafka's per-record costs once per pack instead of once per event. A pack is a
    JSON header line {"keys": [[dedup_key, canonical_key], ...]} and then one canonical-event JSON line
    per key, in the same order (orjson never writes a raw newline), so the keys cost one JSON call per
    pack and the event bytes pass through to events.canonical untouched.
    """

    MAX_BYTES = 256 * 1024  # a pack this big is sent and a new one started

    __slots__ = ("keys", "events", "size")

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []
        self.events: list[bytes] = []
        self.size = 0

    def add(self, event: CanonicalEvent) -> None:
        """Pack an event; raises orjson.JSONEncodeError if it cannot be written as JSON."""
        self.add_json(event.dedup_key(), event.kafka_key(), event.to_json())

    def add_json(self, dedup_key: str, canonical_key: str, event_json: bytes) -> None:
        self.keys.append((dedup_key, canonical_key))
        self.events.append(event_json)
        self.size += len(event_json) + len(dedup_key) + len(canonical_key) + 8

    def to_bytes(self) -> bytes:
        # Cannot fail: every part of a key is also in its event's JSON, which orjson has written already.
        return b"\n".join([orjson.dumps({"keys": self.keys}), *self.events])

    @staticmethod
    def entries(value: bytes) -> list[tuple[bytes, bytes, bytes]]:
        """(dedup_key, canonical_key, canonical_json) per event."""
        header, _, events = value.partition(b"\n")
        if not header.startswith(b"{"):  # a pack of an earlier release: [dedup_key, canonical_key] TAB event
            return tabbed_keyed_entries(value)
        keys = orjson.loads(header)["keys"]
        return [
            (dedup_key.encode(), canonical_key.encode(), event)
            for (dedup_key, canonical_key), event in zip(keys, events.split(b"\n"), strict=True)
        ]


class ReplayTag(Record):
    """Marks the keyed records of one `headwater replay` run, so the dedup stage can report on them."""

    replay_id: str
    reemit: bool = False

    def to_headers(self) -> list[tuple[str, bytes]]:
        return [("hw-replay-id", self.replay_id.encode()), ("hw-reemit", b"1" if self.reemit else b"0")]

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]] | None) -> ReplayTag | None:
        found = dict(headers or ())
        if "hw-replay-id" not in found:
            return None
        return cls(replay_id=found["hw-replay-id"].decode(), reemit=found.get("hw-reemit") == b"1")

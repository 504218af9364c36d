"""Readers for record formats written by earlier releases, still found on topics kept for days."""

from __future__ import annotations

import orjson


def tabbed_keyed_entries(value: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """A keyed pack of an earlier release: one `[dedup_key, canonical_key] TAB event` line per event."""
    out = []
    for line in value.split(b"\n"):
        keys, _, event = line.partition(b"\t")
        dedup_key, canonical_key = orjson.loads(keys)
        out.append((dedup_key.encode(), canonical_key.encode(), event))
    return out

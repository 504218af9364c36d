"""The source ids, derived from the adapter registry (adapters.ADAPTERS owns them)."""

from __future__ import annotations

from adapters import ADAPTERS

SOURCES: tuple[str, ...] = tuple(ADAPTERS)

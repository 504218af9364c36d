"""The adapter registry is explicit and complete (docs/sources.md source table)."""

from __future__ import annotations

import pkgutil

import adapters
from adapters import ADAPTERS

# The source table at the top of docs/sources.md.
SOURCES = {"customerglu", "segment", "moengage", "amplitude", "clevertap", "webengage", "usermaven"}


def test_modules_registry_and_source_ids_are_the_same_seven() -> None:
    """The modules in adapters/, the ADAPTERS keys and the spec's seven source ids are one set."""
    modules = {info.name for info in pkgutil.iter_modules(adapters.__path__)}
    assert modules == set(ADAPTERS) == SOURCES


def test_module_name_is_the_source_id() -> None:
    """Each adapter module is named exactly after its SOURCE."""
    for source, module in ADAPTERS.items():
        assert module.SOURCE == source
        assert getattr(module, "__name__", None) == f"adapters.{source}"


def test_batched_sources_are_the_ones_that_send_batches() -> None:
    """Segment arrays, MoEngage events, CleverTap profiles and Usermaven bulk hold several records (§4)."""
    assert {source for source, module in ADAPTERS.items() if module.BATCHED} == {
        "segment",
        "moengage",
        "clevertap",
        "usermaven",
    }

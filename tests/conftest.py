"""The test suite's fixtures live in tests/rigs/: rigs.fixtures holds the session broker,
per-test settings with unique topic names, and receivers and workers on loopback.

The suite refuses to start on a stale compiled module (rigs.build): it would test an earlier build's
code instead of the tree's. `./dev setup` (or any ./dev command) rebuilds them."""

from __future__ import annotations

import pytest
from rigs.build import ROOT, stale_extensions

pytest_plugins = ["rigs.fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_extensions()
    if stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        raise pytest.UsageError(f"compiled modules older than their source ({names}): run ./dev setup")

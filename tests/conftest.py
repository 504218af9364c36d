"""The test suite's fixtures live in tests/rigs/ (style.md §2.9): rigs.fixtures holds the session broker,
per-test settings with unique topic names, and receivers and workers on loopback.

The suite refuses to run on a stale compiled module (setup.py): an extension older than its source, or
without one, would run the code of an earlier build instead of the tree's. `./dev setup` rebuilds them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["rigs.fixtures"]

ROOT = Path(__file__).resolve().parent.parent


def stale_extensions(root: Path = ROOT) -> list[Path]:
    """The compiled modules in the tree whose source is newer than their extension, or gone."""
    stale = []
    for package in ("pipeline", "adapters"):
        for extension in (root / package).rglob("*.cpython-*.so"):
            source = extension.with_name(extension.name.split(".", 1)[0] + ".py")
            if not source.exists() or source.stat().st_mtime > extension.stat().st_mtime:
                stale.append(source)
    return stale


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_extensions()
    if stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        raise pytest.UsageError(f"compiled modules older than their source ({names}): run ./dev setup")

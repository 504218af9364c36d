"""The tree's compiled modules (setup.py builds them next to their sources in an editable install)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def stale_extensions(root: Path = ROOT) -> list[Path]:
    """The compiled modules in the tree whose source is newer than their extension, or gone: importing
    them would run the code of an earlier build instead of the tree's."""
    stale = []
    for package in ("pipeline", "adapters"):
        for extension in (root / package).rglob("*.cpython-*.so"):
            source = extension.with_name(extension.name.split(".", 1)[0] + ".py")
            if not source.exists() or source.stat().st_mtime > extension.stat().st_mtime:
                stale.append(source)
    return stale

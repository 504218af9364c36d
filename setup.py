"""Build: the worker's per-event modules compiled with mypyc, everything else installed as Python.

mypyc (part of mypy) turns these fully typed modules into C extensions with the same behaviour: the
adapters, the readers they use, the normalize driver and loop, the dedup table and the stage loop, so the
worker spends less CPU per event (the measured gain: docs/benchmarks.md, "Compiled modules"). pyproject.toml holds the project's metadata; only the extension
modules are declared here, because they need code to declare.

HEADWATER_COMPILE=0 installs pure Python (e.g. to step through an adapter in a debugger). So does a
machine without a C compiler or Python's headers, with a warning: the code is the same, only slower.
An editable install (`./dev setup`) builds the extensions next to their sources; `./dev` rebuilds them
when a compiled module's source is newer than its extension, and the test suite refuses to run on a
stale one (tests/conftest.py), so an edit is never shadowed by an older build.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

COMPILED = [
    "adapters/amplitude.py",
    "adapters/clevertap.py",
    "adapters/customerglu.py",
    "adapters/moengage.py",
    "adapters/segment.py",
    "adapters/usermaven.py",
    "adapters/webengage.py",
    "pipeline/fingerprint.py",
    "pipeline/reading.py",
    "pipeline/kafka/partitioning.py",
    "pipeline/stream/consuming.py",
    "pipeline/stream/dedup.py",
    "pipeline/stream/fingerprint_table.py",
    "pipeline/stream/normalize_batch.py",
    "pipeline/stream/record_outcomes.py",
    "pipeline/stream/transactions.py",
]


def _can_compile() -> str | None:
    """Why the extensions cannot be built here, or None when they can."""
    if os.environ.get("HEADWATER_COMPILE", "1") == "0":
        return "HEADWATER_COMPILE=0"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        return f"no C compiler ({compiler.split()[0]}) on PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "Python's headers (Python.h) are not installed"
    return None


def _extensions() -> list[object]:
    reason = _can_compile()
    if reason is not None:
        print(f"headwater: installing pure Python ({reason}); the worker runs slower", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3"))


setup(ext_modules=_extensions())

"""The worker keeps freed heap for the next batch instead of returning it to the kernel (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from pipeline.stream.worker import keep_freed_memory; print(keep_freed_memory())"


def _applied(env: dict[str, str]) -> str:
    """keep_freed_memory() in a fresh interpreter, so that this process's malloc stays as it was."""
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_worker_sets_glibc_to_keep_freed_memory() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _applied(env) == "True"


def test_an_operators_malloc_settings_win() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _applied({**env, "MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"

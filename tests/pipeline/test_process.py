"""Process-wide tuning: the worker keeps freed heap for the next batch instead of returning it to the kernel
(glibc only); the receiver and the worker collect garbage less often and never scan what start-up loaded."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from pipeline.process import keep_freed_memory; print(keep_freed_memory())"


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


def test_settling_the_collector_freezes_what_is_loaded_and_collects_young_objects_less_often() -> None:
    probe = (
        "import gc; from pipeline.process import GC_GEN0_THRESHOLD, settle_garbage_collector;"
        "before = gc.get_threshold(); settle_garbage_collector();"
        "print(gc.get_freeze_count() > 0, gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]


def test_the_worker_collects_young_objects_less_often_than_the_receiver() -> None:
    probe = (
        "import gc; from pipeline.process import WORKER_GC_GEN0_THRESHOLD, settle_garbage_collector;"
        "settle_garbage_collector(WORKER_GC_GEN0_THRESHOLD); print(gc.get_threshold()[0])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert int(done.stdout) == 100_000

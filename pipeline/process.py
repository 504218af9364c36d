"""Process-wide tuning the long-running commands apply once they have started: the garbage collector
(receiver and worker) and glibc's malloc (worker)."""

from __future__ import annotations

import ctypes
import gc
import os

# glibc's mallopt parameters (malloc.h) and what the worker sets them to (keep_freed_memory).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_FREE_BYTES = 64 * 1024 * 1024
HEAP_ALLOCATION_MAX = 32 * 1024 * 1024  # glibc's own ceiling for its adaptive mmap threshold
GC_GEN0_THRESHOLD = 10_000
# The worker has no latency target per object; its young collections are each a scan of the batch in flight.
WORKER_GC_GEN0_THRESHOLD = 100_000


def settle_garbage_collector(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Collect garbage less often, and never scan what start-up loaded (the receiver and the worker).

    The receiver: a request's objects live across a broker round trip, so young
    collections promote them and full collections follow every few seconds, each scanning every object
    the process holds: 33-46 ms of CPU measured at 2,500 requests/s, longer than the p99 we aim for. The
    worker: every event allocates dicts, lists and tuples, so with the defaults a young collection ran
    every few events and the collector took ~5 % of the worker's CPU (perf, single-event records).
    After start-up nothing the process loaded (modules, settings, clients) will become garbage, so it is
    frozen out of all collections, and young collections run every 10,000 allocations instead of 700
    (gc.set_threshold): in the receiver's run GC time fell from 192 to 65 ms and full collections from 2
    to 1. Reference counting still frees almost everything at once; only cycles wait a little longer.
    The worker passes WORKER_GC_GEN0_THRESHOLD: a young collection there scans what the batches in flight
    still hold, so fewer of them do less work. Timed with gc.callbacks over a `bench/worker.py` single-event
    run, the worker's collections after start-up took 0.111 and 0.129 s at 10,000 and 0.060 and 0.074 s at
    100,000 (of ~2.5 s of CPU); the extra young objects are a few MB at most.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def keep_freed_memory() -> bool:
    """Let glibc keep up to KEPT_FREE_BYTES of freed heap instead of handing it back to the kernel.

    A batch frees what the next batch allocates again. With glibc's defaults (trim above 128 KiB) the
    memory goes back to the kernel between batches, and each page costs a page fault when it is touched
    again: ~0.7 faults and ~3 us of CPU per single-event record in the normalize stage, in-process.
    Allocations up to HEAP_ALLOCATION_MAX (fetch responses) come from the heap, as glibc's adaptive
    threshold would let them once it had grown; setting a threshold turns the adaptation off.
    Returns whether it applied: not off glibc, nor when MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_
    is in the environment (the operator's choice wins).
    """
    if {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & os.environ.keys():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no libc symbols to find)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOCATION_MAX) and mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES)
    )

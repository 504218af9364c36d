"""The retry schedule: which pending rewards of the owned partitions are due, and for which tenant.

An index only: the delivery stage's state table is the truth, and the schedule is rebuilt from it on every
assignment. A partition taken over is *held* until the delivery stage has applied every record that was on
it at the takeover (its end offset then): outcomes of attempts made before a crash are applied before
anything could be re-sent, so only attempts whose outcome never reached Kafka run again.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict, deque
from dataclasses import dataclass


@dataclass(slots=True)
class _Entry:
    due_at: float
    tenant: str
    partition: int


class Schedule:
    """Due times per partition (a heap each), then a ready queue per tenant that its free slots drain."""

    def __init__(self) -> None:
        self._entries: dict[bytes, _Entry] = {}
        self._heaps: dict[int, list[tuple[float, int, bytes]]] = defaultdict(list)
        self._ready: dict[str, deque[bytes]] = defaultdict(deque)
        self._queued: set[bytes] = set()
        self._seq = itertools.count()
        self.running: set[bytes] = set()
        self.in_flight: Counter[str] = Counter()
        self._hold: dict[int, int] = {}  # partition -> the offset the stage must have applied
        self._depth: Counter[str] = Counter()

    def put(self, key: bytes, due_at: float, tenant: str, partition: int) -> None:
        if key not in self._entries:
            self._depth[tenant] += 1
        self._entries[key] = _Entry(due_at, tenant, partition)
        heapq.heappush(self._heaps[partition], (due_at, next(self._seq), key))

    def drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._depth[entry.tenant] -= 1

    def forget(self, partitions: set[int]) -> None:
        """Drop the index of partitions no longer owned; attempts in flight stay in `running`."""
        for key in [k for k, e in self._entries.items() if e.partition in partitions]:
            self.drop(key)
        for partition in partitions:
            self._heaps.pop(partition, None)
            self._hold.pop(partition, None)

    def hold(self, partition: int, last_offset: int) -> None:
        """No attempt of `partition` starts until the stage has applied `last_offset` there. No time cap:
        a capped hold would re-send, on a slow restart, rewards whose delivery is already recorded."""
        self._hold[partition] = last_offset

    def held(self) -> dict[int, int]:
        return dict(self._hold)

    def applied(self, partition: int, offset: int) -> None:
        """The stage has applied (committed) `partition` up to and including `offset`."""
        held = self._hold.get(partition)
        if held is not None and offset >= held:
            del self._hold[partition]

    def move_due(self, now: float) -> set[str]:
        """Move due keys of released partitions to their tenants' ready queues; returns those tenants."""
        tenants: set[str] = set()
        for partition, heap in self._heaps.items():
            if partition in self._hold:
                continue
            while heap and heap[0][0] <= now:
                due_at, _, key = heapq.heappop(heap)
                entry = self._entries.get(key)
                if entry is None or entry.due_at != due_at or key in self._queued or key in self.running:
                    continue  # superseded by a later put, or already on its way
                self._ready[entry.tenant].append(key)
                self._queued.add(key)
                tenants.add(entry.tenant)
        return tenants

    def has_ready(self, tenant: str) -> bool:
        return bool(self._ready.get(tenant))

    def next_ready(self, tenant: str) -> bytes | None:
        queue = self._ready.get(tenant)
        while queue:
            key = queue.popleft()
            self._queued.discard(key)
            if key in self._entries and key not in self.running:
                return key
        return None

    def ready_tenants(self) -> list[str]:
        return [tenant for tenant, queue in self._ready.items() if queue]

    def depth(self, tenant: str) -> int:
        """Pending rewards of a tenant (waiting for their time, for a slot, or in flight)."""
        return self._depth[tenant]

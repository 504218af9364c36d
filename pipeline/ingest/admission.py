"""Who may start a write now, and who may hold body bytes: the in-flight bound, shared fairly between tenants.

Two budgets. Slots (`max_in_flight`) are taken before a body is read: while other tenants are active a
tenant may hold at most max_in_flight / active tenants of them; beyond that it gets 429 + Retry-After (its
own excess, not an outage). Alone, a tenant may use every slot. A request within its share that finds no
free slot waits a short while (free slots go to the waiting tenant holding the fewest slots first), then
gets 503 + Retry-After.

Bytes (`max_bytes_in_flight`) are counted as a body arrives, not as its Content-Length announces: a sender
that declares a large body and trickles it holds only what it has sent. When the byte budget is full, the
tenant holding more than its byte share (budget / active tenants) gives way: its request is refused
(429) if it is the one asking, else its largest body still being read is refused to make room. So a
tenant's slow or stalled bodies never keep another tenant's request waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ReceiverSettings
from pipeline.errors import BrokerUnavailable
from pipeline.ingest.refusals import OverShare

Refusal = Callable[[str, str], None]  # (tenant, reason) -> count it


@dataclass(eq=False)
class Lease:
    """One admitted request: its slot and the body bytes it holds. While `task` is set its body is still
    being read, and the task may be interrupted (`evicted`) to free the bytes for another tenant."""

    tenant: str
    nbytes: int = 0
    task: asyncio.Task[Any] | None = None
    evicted: bool = False
    left: bool = False


@dataclass
class _Waiter:
    tenant: str
    granted: asyncio.Future[Lease] = field(repr=False)


class Admission:
    """In-flight accounting per tenant; `enter` takes a slot, `charge` adds body bytes, `leave` frees both."""

    def __init__(self, cfg: ReceiverSettings, refused: Refusal | None = None) -> None:
        self.cfg = cfg
        self.count = 0
        self.bytes = 0
        self.by_tenant: dict[str, int] = {}
        self.bytes_by_tenant: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.reading: dict[str, set[Lease]] = {}  # tenant -> leases whose body is being read
        self._queue: deque[_Waiter] = deque()
        self._bytes_freed: asyncio.Future[None] | None = None
        self._pruned_at = 0.0
        self._refused = refused or (lambda tenant, reason: None)

    # --- slots --------------------------------------------------------------------------------------

    def _active_tenants(self, now: float) -> int:
        """Tenants with a request in flight, waiting, or seen within fair_window_s."""
        horizon = now - self.cfg.fair_window_s
        if now - self._pruned_at > self.cfg.fair_window_s:
            self.last_seen = {t: seen for t, seen in self.last_seen.items() if seen >= horizon}
            self._pruned_at = now
        active = {t for t, seen in self.last_seen.items() if seen >= horizon}
        return len(active | self.by_tenant.keys() | self.waiting.keys())

    def over_share(self, tenant: str, now: float) -> bool:
        held = self.by_tenant.get(tenant, 0)
        # fast path: under the share even if every tenant we know of were active
        known = len(self.last_seen) + len(self.by_tenant) + len(self.waiting)
        if (held + 1) * known <= self.cfg.max_in_flight:
            return False
        active = self._active_tenants(now)
        if active <= 1:
            return False
        return (held + 1) * active > self.cfg.max_in_flight

    def enter(self, tenant: str) -> Lease | Awaitable[Lease]:
        """Take one slot for `tenant`: the Lease when taken at once, else an awaitable that takes it (after a
        wait) or raises; raises OverShare (429) / BrokerUnavailable (503) when refused now."""
        now = time.monotonic()
        self.last_seen[tenant] = now
        if self.cfg.fair_shares and self.over_share(tenant, now):
            self._refused(tenant, "over_share")
            raise OverShare(
                "this tenant is over its share of the receiver's in-flight writes", self.cfg.retry_after_s
            )
        if self.count < self.cfg.max_in_flight:
            return self._take(tenant)
        if self.cfg.admission_wait_s <= 0:
            self._refuse_busy(tenant)
        return self._wait(tenant)

    async def _wait(self, tenant: str) -> Lease:
        waiter = _Waiter(tenant, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.waiting[tenant] = self.waiting.get(tenant, 0) + 1
        timer = asyncio.get_running_loop().call_later(self.cfg.admission_wait_s, self._expire, waiter)
        try:
            return await waiter.granted
        except asyncio.CancelledError:
            granted = waiter.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.leave(granted.result())  # granted just as the request went away
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise
        finally:
            timer.cancel()
            left = self.waiting[tenant] - 1
            if left:
                self.waiting[tenant] = left
            else:
                del self.waiting[tenant]

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.granted.done():
            return
        self._queue.remove(waiter)
        try:
            self._refuse_busy(waiter.tenant)
        except BrokerUnavailable as exc:
            waiter.granted.set_exception(exc)

    def _refuse_busy(self, tenant: str) -> None:
        self._refused(tenant, "in_flight_bound")
        raise BrokerUnavailable("too many writes in flight", self.cfg.retry_after_s)

    def _take(self, tenant: str) -> Lease:
        self.count += 1
        self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + 1
        return Lease(tenant)

    def leave(self, lease: Lease) -> None:
        """Give back the lease's slot and bytes (once; an evicted lease's bytes are already back)."""
        if lease.left:
            return
        lease.left = True
        self.stop_reading(lease)
        self._free_bytes(lease)
        self.count -= 1
        held = self.by_tenant[lease.tenant] - 1
        if held:
            self.by_tenant[lease.tenant] = held
        else:
            del self.by_tenant[lease.tenant]
        self._grant()

    def _grant(self) -> None:
        """Free slots go to the waiter whose tenant holds the fewest; one over its share by now gets 429."""
        while self._queue and self.count < self.cfg.max_in_flight:
            waiter = min(self._queue, key=lambda w: self.by_tenant.get(w.tenant, 0))
            self._queue.remove(waiter)
            if waiter.granted.done():
                continue
            if self.cfg.fair_shares and self.over_share(waiter.tenant, time.monotonic()):
                self._refused(waiter.tenant, "over_share")
                waiter.granted.set_exception(
                    OverShare(
                        "this tenant is over its share of the receiver's in-flight writes",
                        self.cfg.retry_after_s,
                    )
                )
                continue
            waiter.granted.set_result(self._take(waiter.tenant))

    # --- bytes --------------------------------------------------------------------------------------

    def start_reading(self, lease: Lease, task: asyncio.Task[Any]) -> None:
        """The lease's body is being read by `task`: it may be evicted while it is."""
        lease.task = task
        self.reading.setdefault(lease.tenant, set()).add(lease)

    def stop_reading(self, lease: Lease) -> None:
        if lease.task is None:
            return
        lease.task = None
        leases = self.reading.get(lease.tenant)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del self.reading[lease.tenant]

    def charge(self, lease: Lease, nbytes: int) -> Awaitable[None] | None:
        """Count `nbytes` more body bytes for the lease: None when counted, else an awaitable that counts
        them once bytes are freed (or raises 503 after admission_wait_s); raises OverShare when the budget
        is full and this tenant holds more than its byte share."""
        if self.bytes + nbytes > self.cfg.max_bytes_in_flight and not self._make_room(lease, nbytes):
            return self._wait_for_bytes(lease, nbytes)
        self._add_bytes(lease, nbytes)
        return None

    def _add_bytes(self, lease: Lease, nbytes: int) -> None:
        lease.nbytes += nbytes
        self.bytes += nbytes
        self.bytes_by_tenant[lease.tenant] = self.bytes_by_tenant.get(lease.tenant, 0) + nbytes

    def _free_bytes(self, lease: Lease) -> None:
        if not lease.nbytes:
            return
        self.bytes -= lease.nbytes
        held = self.bytes_by_tenant[lease.tenant] - lease.nbytes
        if held:
            self.bytes_by_tenant[lease.tenant] = held
        else:
            del self.bytes_by_tenant[lease.tenant]
        lease.nbytes = 0
        freed, self._bytes_freed = self._bytes_freed, None
        if freed is not None and not freed.done():
            freed.set_result(None)

    def _make_room(self, lease: Lease, nbytes: int) -> bool:
        """The budget is full: refuse the asking tenant if it is over its byte share, else evict bodies of
        tenants over theirs (largest first) until `nbytes` fit. True when they fit now."""
        if not self.cfg.fair_shares:
            return False
        active = self._active_tenants(time.monotonic())
        if active <= 1:
            return False
        share = self.cfg.max_bytes_in_flight / active
        if self.bytes_by_tenant.get(lease.tenant, 0) + nbytes > share:
            self._refused(lease.tenant, "over_byte_share")
            raise OverShare(
                "this tenant is over its share of the receiver's in-memory bytes", self.cfg.retry_after_s
            )
        hogs = [
            other
            for tenant, leases in self.reading.items()
            if tenant != lease.tenant and self.bytes_by_tenant.get(tenant, 0) > share
            for other in leases
        ]
        for other in sorted(hogs, key=lambda held: held.nbytes, reverse=True):
            if self.bytes + nbytes <= self.cfg.max_bytes_in_flight:
                break
            if self.bytes_by_tenant.get(other.tenant, 0) > share:
                self._evict(other)
        return self.bytes + nbytes <= self.cfg.max_bytes_in_flight

    def _evict(self, lease: Lease) -> None:
        """Interrupt a body being read (its handler answers 429) and take its bytes back now."""
        task = lease.task
        self.stop_reading(lease)
        self._refused(lease.tenant, "over_byte_share")
        lease.evicted = True
        self._free_bytes(lease)
        if task is not None:
            task.cancel()

    async def _wait_for_bytes(self, lease: Lease, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.admission_wait_s
        while self.bytes + nbytes > self.cfg.max_bytes_in_flight:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._refuse_busy(lease.tenant)
            if self._bytes_freed is None or self._bytes_freed.done():
                self._bytes_freed = loop.create_future()
            freed = self._bytes_freed
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.shield(freed)
            except TimeoutError:
                self._refuse_busy(lease.tenant)
            if self._make_room(lease, nbytes):
                break
        self._add_bytes(lease, nbytes)

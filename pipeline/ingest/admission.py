"""Who may start a write now: the in-flight bound (count and bytes), shared fairly between tenants.

A slot is taken before the body is read, so the bound limits memory too (issue 11, items 3 and 4).
While other tenants are active, a tenant may hold at most max_in_flight / active tenants slots; beyond
that it gets 429 + Retry-After (its own excess, not an outage). Alone, a tenant may use every slot. A
request within its share that finds no free slot waits a short while (free slots go to the waiting
tenant holding the fewest slots first), then gets 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipeline.config import ReceiverSettings
from pipeline.errors import BrokerUnavailable
from pipeline.ingest.refusals import OverShare

Refusal = Callable[[str, str], None]  # (tenant, reason) -> count it


@dataclass
class _Waiter:
    tenant: str
    nbytes: int
    granted: asyncio.Future[None]


class Admission:
    """In-flight accounting per tenant; `enter` takes a slot or raises, `leave` gives it back."""

    def __init__(self, cfg: ReceiverSettings, refused: Refusal | None = None) -> None:
        self.cfg = cfg
        self.count = 0
        self.bytes = 0
        self.by_tenant: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self._queue: deque[_Waiter] = deque()
        self._pruned_at = 0.0
        self._refused = refused or (lambda tenant, reason: None)

    def _fits(self, nbytes: int) -> bool:
        return self.count < self.cfg.max_in_flight and self.bytes + nbytes <= self.cfg.max_bytes_in_flight

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

    def enter(self, tenant: str, nbytes: int) -> Awaitable[None] | None:
        """Take one slot of `nbytes` for `tenant`: None when taken at once, else an awaitable that takes it
        (after a wait) or raises; raises OverShare (429) / BrokerUnavailable (503) when refused now."""
        now = time.monotonic()
        self.last_seen[tenant] = now
        if self.cfg.fair_shares and self.over_share(tenant, now):
            self._refused(tenant, "over_share")
            raise OverShare(
                "this tenant is over its share of the receiver's in-flight writes", self.cfg.retry_after_s
            )
        if self._fits(nbytes):
            self._take(tenant, nbytes)
            return None
        if self.cfg.admission_wait_s <= 0:
            self._refuse_busy(tenant)
        return self._wait(tenant, nbytes)

    async def _wait(self, tenant: str, nbytes: int) -> None:
        waiter = _Waiter(tenant, nbytes, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.waiting[tenant] = self.waiting.get(tenant, 0) + 1
        timer = asyncio.get_running_loop().call_later(self.cfg.admission_wait_s, self._expire, waiter)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            granted = waiter.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self.leave(tenant, nbytes)  # granted just as the request went away
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

    def _take(self, tenant: str, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + 1

    def resize(self, nbytes_before: int, nbytes_after: int) -> None:
        """The body turned out to be `nbytes_after` long (a request without Content-Length)."""
        self.bytes += nbytes_after - nbytes_before
        self._grant()

    def leave(self, tenant: str, nbytes: int) -> None:
        self.count -= 1
        self.bytes -= nbytes
        held = self.by_tenant[tenant] - 1
        if held:
            self.by_tenant[tenant] = held
        else:
            del self.by_tenant[tenant]
        self._grant()

    def _grant(self) -> None:
        """Free slots go to the waiter whose tenant holds the fewest; one over its share by now gets 429."""
        while self._queue:
            waiter = min(self._queue, key=lambda w: self.by_tenant.get(w.tenant, 0))
            if not self._fits(waiter.nbytes):
                return
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
            self._take(waiter.tenant, waiter.nbytes)
            waiter.granted.set_result(None)

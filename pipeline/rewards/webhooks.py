"""The dispatcher's moving parts without Faust: the HTTP sender, per-tenant breakers, the retry schedule.

pipeline.rewards.dispatcher wires them into agents. Nothing here awaits anything but the webhook request
and the release of a held partition, so none of it can stall a partition.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp

from pipeline import __version__
from pipeline.config import RewardsWebhook
from pipeline.records import utc_now
from pipeline.rewards.records import Attempt, parse_retry_after
from pipeline.signing import SIGNATURE_HEADER, cg_signature, standard_headers

log = logging.getLogger(__name__)
USER_AGENT = f"headwater-rewards/{__version__}"
ERROR_SNIPPET_BYTES = 200


# --- HTTP ---------------------------------------------------------------------------------------------


def request_headers(hook: RewardsWebhook, reward_id: str, body: bytes, attempt: int) -> dict[str, str]:
    """Headers of one attempt. X-Reward-Id and webhook-id stay the same on every attempt (idempotency)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Reward-Id": reward_id,
        "X-Reward-Attempt": str(attempt),
    }
    if hook.token is not None:
        headers[SIGNATURE_HEADER] = cg_signature(body, hook.token.get_secret_value())
    if hook.standard_webhooks_secrets:
        secrets = [s.get_secret_value() for s in hook.standard_webhooks_secrets]
        headers.update(standard_headers(reward_id, body, secrets))
    return headers


class Sender:
    """POSTs reward bodies; one connection pool per tenant, so a slow tenant cannot hold another's sockets."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, tenant: str, hook: RewardsWebhook) -> aiohttp.ClientSession:
        session = self._sessions.get(tenant)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=hook.max_concurrency, ttl_dns_cache=300)
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            self._sessions[tenant] = session
        return session

    async def post(
        self, tenant: str, hook: RewardsWebhook, reward_id: str, body: bytes, number: int
    ) -> Attempt:
        """One attempt; never raises for network trouble: the Attempt carries the status or the error."""
        at = utc_now()
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            async with self._session(tenant, hook).post(
                hook.url,
                data=body,
                headers=request_headers(hook, reward_id, body, number),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=hook.timeout_s),
            ) as response:
                status = response.status
                snippet = await response.content.read(ERROR_SNIPPET_BYTES)
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {snippet.decode('utf-8', 'replace')}".strip()
                    retry_after = parse_retry_after(response.headers.get("Retry-After"), at)
        except TimeoutError:
            error = f"timeout: no answer within {hook.timeout_s} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return Attempt(
            number=number, at=at, status=status, latency_ms=latency_ms, error=error, retry_after_s=retry_after
        )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


# --- circuit breaker ------------------------------------------------------------------------------------


class Breaker:
    """Per-tenant circuit breaker over consecutive retriable failures.

    closed: send, up to the tenant's concurrency. After `failures` consecutive failed attempts (5xx,
    408, 429, timeout, connection error) it opens: due attempts are then recorded as failed at once
    ("circuit open") without a request, so they follow their schedule towards the DLQ instead of piling
    up. After `open_s` one probe goes out (half-open); its success closes the breaker, its failure
    reopens it. An answer that is not retried (2xx, other 4xx) proves the endpoint alive: count reset.
    """

    def __init__(self, tenant: str, failures: int, open_s: float) -> None:
        self.tenant = tenant
        self.failures = failures
        self.open_s = open_s
        self.state: Literal["closed", "open", "half_open"] = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.probing = False

    def admit(self, now: float) -> Literal["send", "skip"]:
        """May one more attempt go out now? (Concurrency is the caller's business.)"""
        if self.state == "open" and now >= self.opened_at + self.open_s:
            self.state, self.probing = "half_open", False
        if self.state == "closed":
            return "send"
        if self.state == "half_open" and not self.probing:
            self.probing = True
            return "send"
        return "skip"

    def record(self, alive: bool, now: float) -> None:
        if alive:
            self.state, self.consecutive, self.probing = "closed", 0, False
            return
        self.consecutive += 1
        if self.state == "half_open" or self.consecutive >= self.failures:
            if self.state != "open":
                log.warning(
                    "circuit breaker of tenant %s opens after %d consecutive failures for %.0f s",
                    self.tenant,
                    self.consecutive,
                    self.open_s,
                )
            self.state, self.opened_at, self.probing = "open", now, False


# --- schedule -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    due_at: float
    tenant: str
    partition: int


class Schedule:
    """In-memory index of the pending keys of this worker's active partitions; the state table is the truth.

    A heap per partition orders keys by due time; due keys move to their tenant's ready queue and start
    when the tenant has a free slot. After a rebalance a partition is *held* until the deliver agent has
    read the catch-up marker written to it at takeover: outcomes of attempts made before a crash are
    applied before anything is re-sent, so only attempts whose outcome never reached Kafka run again.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, _Entry] = {}
        self._heaps: dict[int, list[tuple[float, int, bytes]]] = defaultdict(list)
        self._ready: dict[str, deque[bytes]] = defaultdict(deque)
        self._queued: set[bytes] = set()
        self._seq = itertools.count()
        self.running: set[bytes] = set()
        self.in_flight: Counter[str] = Counter()
        self._hold: dict[int, int | None] = {}  # partition -> offset the agent must have read
        self._read_up_to: dict[int, int] = {}  # partition -> highest offset the agent has read
        self._released: dict[int, asyncio.Event] = {}  # partition -> set when its hold ends
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

    def clear(self) -> None:
        """Forget the index (rebalance); attempts in flight stay in `running` and are not started twice."""
        self._entries.clear()
        self._depth.clear()
        self._heaps.clear()
        self._ready.clear()
        self._queued.clear()
        self._hold.clear()
        for released in self._released.values():  # whoever waits on a hold learns it is gone
            released.set()
        self._released.clear()

    def hold(self, partition: int, offset: int | None = None) -> None:
        """No retries of `partition` run until the agent has read `offset` there (None: not known yet).

                There is no time cap: on a slow restart a capped hold would re-send rewards already delivered
        . An offset the agent has already read releases the partition at once.
        """
        if offset is not None and self._read_up_to.get(partition, -1) >= offset:
            self._release(partition)
            return
        self._hold[partition] = offset
        self._released.setdefault(partition, asyncio.Event())

    def held(self) -> dict[int, int | None]:
        """Partition -> offset the deliver agent must read before that partition's retries run."""
        return dict(self._hold)

    def read_up_to(self, partition: int) -> int:
        """The highest offset of `partition` the deliver agent has read (-1: none yet)."""
        return self._read_up_to.get(partition, -1)

    async def wait_released(self, partition: int, timeout_s: float) -> bool:
        """True once `partition` is not held (its marker read, or the index cleared); False on timeout."""
        released = self._released.get(partition)
        if partition not in self._hold or released is None:
            return True
        try:
            await asyncio.wait_for(released.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def seen(self, partition: int, offset: int) -> None:
        """The deliver agent has read `offset` of `partition`."""
        if offset > self._read_up_to.get(partition, -1):
            self._read_up_to[partition] = offset
        held = self._hold.get(partition)
        if held is not None and offset >= held:
            self._release(partition)

    def _release(self, partition: int) -> None:
        self._hold.pop(partition, None)
        released = self._released.pop(partition, None)
        if released is not None:
            released.set()

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


async def hold_until_read(
    schedule: Schedule,
    partition: int,
    write_marker: Callable[[], Awaitable[int | None]],
    current: Callable[[], bool],
    unread_s: float,
) -> bool:
    """Hold `partition` until the deliver agent has read a catch-up marker there: True once released.

    `write_marker` appends a marker and returns its offset (None: it gave up, the takeover is over).
    Faust can lose a fetched record on its way to the agent (docs/decisions/0005); a lost marker that is
    the partition's last record shows no gap. So while the agent reads nothing more of the partition
    for `unread_s`, another marker is written: any later
    marker proves the same thing (everything the partition held at takeover has been read), so the
    hold still ends on a read, never on a timer. False once `current()` is false (a rebalance).
    """
    while current():
        offset = await write_marker()
        if offset is None or not current():
            return False
        schedule.hold(partition, offset)
        log.debug("partition %d held until offset %d is read", partition, offset)
        read = schedule.read_up_to(partition)
        while not await schedule.wait_released(partition, unread_s):
            if not current():
                return False
            if schedule.read_up_to(partition) == read:  # no progress since the last look: marker lost
                log.warning(
                    "partition %d: catch-up marker at offset %d not read after %.0f s (read up to %d);"
                    " writing another",
                    partition,
                    offset,
                    unread_s,
                    read,
                )
                break
            read = schedule.read_up_to(partition)
        else:
            return current()
    return False

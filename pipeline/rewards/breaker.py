"""The per-tenant circuit breaker: a dead endpoint costs its tenant's schedule, not anyone's sockets."""

from __future__ import annotations

import logging
from typing import Literal

log = logging.getLogger(__name__)


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

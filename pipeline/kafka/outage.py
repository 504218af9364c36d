"""Kafka outages, logged quietly: one line when Kafka becomes unreachable (which broker, since when), a
summary at most every `summary_every_s` while it lasts, one line when it is back.

aiokafka logs every failed attempt (`Unable connect to node with id 1`, `Unable to update metadata`, at
ERROR), several per second per client: a worker wrote 36,000 lines in a one-minute outage. `OutageFilter`
sits on Headwater's log handler and turns those records into the lines above; while Kafka is
unreachable, every aiokafka warning or error is counted in the summary instead of printed. A watcher
thread probes the bootstrap servers (a TCP connect) while an outage lasts and ends it when one answers
and aiokafka has stopped failing. `OUTAGE.state()` is what the health and readiness endpoints show.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import Counter
from datetime import UTC, datetime

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 30.0
PROBE_EVERY_S = 1.0
QUIET_BEFORE_BACK_S = 2.0  # no aiokafka failure for this long (and a broker answers): the outage is over
# aiokafka's messages for a broker it cannot reach (aiokafka/client.py, producer/sender.py, fetcher.py)
CONNECTION_FAILURES = frozenset(
    {
        'Unable connect to "%s:%s": %s',
        'Unable to request metadata from "%s:%s": %s',
        "Unable to update metadata from %s",
        "Unable connect to node with id %s: %s",
        "Unable to request metadata from node with id %s: %r",
        "Failed fetch messages from %s: %s",
        "Failed fetch offsets from %s: %s",
        "Got error produce response: %s",
        "Cannot send %r to %s: %r",
    }
)
_ADDRESS = re.compile(r"\('([^']+)', (\d+)\)|\"([^\"]+):(\d+)\"")


def _utc(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class KafkaOutage:
    """The process's view of Kafka's reachability, fed by aiokafka's log records and a probe."""

    def __init__(self, summary_every_s: float = SUMMARY_EVERY_S) -> None:
        self.summary_every_s = summary_every_s
        self.bootstrap: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._since_wall: float | None = None
        self._since: float = 0.0
        self._first_error = ""
        self._last_failure = 0.0
        self._last_summary = 0.0
        self._total = 0
        self._window: Counter[str] = Counter()
        self._brokers: set[str] = set()
        self._watcher: threading.Thread | None = None

    def set_bootstrap(self, servers: str) -> None:
        """`host:port,host:port` of kafka.bootstrap_servers: what the probe connects to."""
        out = []
        for server in servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if host and port.isdigit():
                out.append((host.strip("[]"), int(port)))
        self.bootstrap = out

    @property
    def down(self) -> bool:
        return self._since_wall is not None

    def state(self) -> dict[str, object]:
        """For /healthz and /readyz: reachable, or since when not, and the first error seen."""
        with self._lock:
            if self._since_wall is None:
                return {"reachable": True}
            return {
                "reachable": False,
                "unreachable_since": _utc(self._since_wall),
                "seconds": round(time.monotonic() - self._since, 1),
                "error": self._first_error,
                "failed_attempts": self._total,
            }

    def failure(self, record: logging.LogRecord) -> None:
        """An aiokafka record while Kafka fails: the first opens the outage (one line), later ones are
        counted; a summary is logged when one is due."""
        now = time.monotonic()
        message = record.getMessage()
        opened = summary = None
        with self._lock:
            self._last_failure = now
            self._total += 1
            self._window[record.msg if isinstance(record.msg, str) else message] += 1
            for match in _ADDRESS.finditer(message):
                host, port = (match[1], match[2]) if match[1] else (match[3], match[4])
                self._brokers.add(f"{host}:{port}")
            if self._since_wall is None:
                self._since_wall, self._since = time.time(), now
                self._first_error = message[:300]
                self._last_summary = now
                self._window.clear()
                opened = message
            elif now - self._last_summary >= self.summary_every_s:
                summary = self._summary(now)
        if opened is not None:
            log.warning(
                "Kafka unreachable (%s) since %s: %s (repeats are summarised every %g s)",
                self._broker_names(),
                _utc(self._since_wall or time.time()),
                opened[:300],
                self.summary_every_s,
            )
            self._start_watcher()
        if summary:
            log.warning("%s", summary)

    def _summary(self, now: float) -> str:
        """Call with the lock held."""
        counts = ", ".join(f"{n} x {template!r}" for template, n in self._window.most_common(3))
        brokers = self._broker_names()
        self._window.clear()
        self._last_summary = now
        return (
            f"Kafka still unreachable ({brokers}) since {_utc(self._since_wall or 0)}, "
            f"{now - self._since:.0f} s; {self._total} failed attempts so far, lately {counts or 'none'}"
        )

    def _broker_names(self) -> str:
        """The brokers named in aiokafka's messages, else the bootstrap servers."""
        named = self._brokers or {f"{host}:{port}" for host, port in self.bootstrap}
        return ", ".join(sorted(named)) or "bootstrap servers unknown"

    def tick(self) -> None:
        """Probe while down: the outage ends when a bootstrap server answers and aiokafka is quiet; a
        summary is due even when aiokafka has stopped logging."""
        if self._since_wall is None:
            return
        now = time.monotonic()
        summary = None
        with self._lock:
            if now - self._last_summary >= self.summary_every_s:
                summary = self._summary(now)
        if summary:
            log.warning("%s", summary)
        if now - self._last_failure < QUIET_BEFORE_BACK_S or not self._answers():
            return
        with self._lock:
            seconds, total = now - self._since, self._total
            self._since_wall = None
            self._total = 0
            self._window.clear()
            self._brokers.clear()
        log.warning("Kafka reachable again after %.0f s unreachable (%d failed attempts)", seconds, total)

    def _answers(self) -> bool:
        for host, port in self.bootstrap:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return True
            except OSError:
                continue
        return not self.bootstrap and time.monotonic() - self._last_failure > 10 * QUIET_BEFORE_BACK_S

    def _start_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._watcher = threading.Thread(target=self._watch, name="headwater-kafka-outage", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self._since_wall is not None:
            time.sleep(PROBE_EVERY_S)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the watcher must not die; the next tick tries again
                log.debug("outage watcher tick failed", exc_info=True)


OUTAGE = KafkaOutage()


def is_connection_failure(record: logging.LogRecord) -> bool:
    return record.name.startswith("aiokafka") and record.msg in CONNECTION_FAILURES


class OutageFilter(logging.Filter):
    """On Headwater's handler: aiokafka's connection failures become OUTAGE's lines; while Kafka is
    unreachable, aiokafka's other warnings and errors are counted in its summaries instead of printed."""

    def __init__(self, outage: KafkaOutage = OUTAGE) -> None:
        super().__init__()
        self.outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("aiokafka"):
            return True
        if is_connection_failure(record) or self.outage.down:
            self.outage.failure(record)
            return False
        return True

"""Run vegeta (an open-loop HTTP load generator) at a fixed rate against one endpoint; parse its report.

The receiver's latency at a share of its peak needs a generator that holds a rate whatever the server does:
wrk is closed-loop (a slow answer delays the next request, so its percentiles hide queueing), and a Python
client in the benchmark process cannot schedule thousands of requests a second on two cores. vegeta sends
on schedule from as many workers as it needs and measures each request from its own send, so queueing in
the receiver shows up in p99. Only a benchmark tool, never needed by CI:

    GOBIN=$PWD/.venv/bin go install github.com/tsenart/vegeta/v12@v12.13.0
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "v12.13.0"


@dataclass
class VegetaResult:
    label: str
    target_rate: float
    rate: float = 0.0  # requests/s sent
    throughput: float = 0.0  # successful requests/s
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    percentiles_ms: dict[int, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    steal: float | None = None  # the machine's CPU steal during the attack (share of all CPU time)

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def failures(self) -> int:
        return self.requests - self.ok

    def line(self) -> str:
        cpu = " ".join(f"{k} {v:.0%}" for k, v in self.cpu.items())
        return (
            f"{self.label:<30} {self.rate:>9,.0f} req/s sent (target {self.target_rate:,.0f})  "
            f"p50 {self.percentiles_ms.get(50, 0):6.1f} ms  p99 {self.percentiles_ms.get(99, 0):6.1f} ms  "
            f"max {self.percentiles_ms.get(100, 0):6.1f} ms  ok {self.ok}  failed {self.failures}"
            + (f"  cpu[{cpu}]" if cpu else "")
            + (f"  steal {self.steal:.1%}" if self.steal is not None else "")
        )


def binary() -> str | None:
    """vegeta on PATH, or beside this interpreter (where the go install line above puts it)."""
    beside = Path(sys.executable).parent / "vegeta"
    return shutil.which("vegeta") or (str(beside) if beside.exists() else None)


def targets(path: Path, url: str, body_file: Path, headers: dict[str, str]) -> Path:
    """A targets file in vegeta's http format: one POST with our headers and the body from a file."""
    lines = [f"POST {url}", *(f"{k}: {v}" for k, v in headers.items()), f"@{body_file}", ""]
    path.write_text("\n".join(lines))
    return path


MAX_WORKERS = 512  # requests in flight at most: the rate holds while latency stays under 512 / rate


def attack(vegeta: str, targets_file: Path, rate: float, seconds: float, label: str) -> VegetaResult:
    """Send `rate` requests/s for `seconds`; percentiles from vegeta's own histogram of every request.

    vegeta adds a worker (and a connection) whenever all are busy; without a cap, a server that slows
    down is met with thousands of new connections and the generator takes the machine's CPU. With the
    cap, a server slower than MAX_WORKERS / rate makes vegeta fall behind the rate instead, which the
    result shows as `rate` (sent) below `target_rate`."""
    attack_cmd = [
        vegeta,
        "attack",
        f"-targets={targets_file}",
        f"-rate={max(1, round(rate))}/1s",
        f"-duration={seconds:.0f}s",
        "-timeout=30s",
        "-keepalive=true",
        f"-max-workers={MAX_WORKERS}",
    ]
    attacked = subprocess.run(attack_cmd, capture_output=True, check=True)
    report = subprocess.run(
        [vegeta, "report", "-type=json"], input=attacked.stdout, capture_output=True, check=True
    ).stdout
    data = json.loads(report)
    latencies = data.get("latencies", {})
    result = VegetaResult(label, rate)
    result.rate = float(data.get("rate", 0.0))
    result.throughput = float(data.get("throughput", 0.0))
    result.requests = int(data.get("requests", 0))
    result.statuses = {str(k): int(v) for k, v in (data.get("status_codes") or {}).items()}
    result.errors = list(data.get("errors") or [])[:5]
    for pct, key in ((50, "50th"), (90, "90th"), (99, "99th"), (100, "max")):
        if key in latencies:
            result.percentiles_ms[pct] = latencies[key] / 1e6  # ns
    return result

"""Run wrk (Debian's `wrk` package) against one endpoint with one request body; parse its report.

wrk is only a load generator for the benchmarks (never needed by CI): `apt-get install -y wrk`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class WrkResult:
    label: str
    rate: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    percentiles_ms: dict[int, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    events_per_request: int = 1
    steal: float | None = None  # the machine's CPU steal during the phase (share of all CPU time)

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    def line(self) -> str:
        cpu = " ".join(f"{k} {v:.0%}" for k, v in self.cpu.items())
        main = next(iter(self.cpu.values()), 0.0)
        if main:
            cpu += f"; {self.rate / main:,.0f} req per CPU-s ({1e6 * main / self.rate:,.0f} us CPU/req)"
        return (
            f"{self.label:<30} {self.rate:>9,.0f} req/s {self.rate * self.events_per_request:>10,.0f} ev/s"
            f"  p50 {self.percentiles_ms.get(50, 0):6.1f} ms  p99 {self.percentiles_ms.get(99, 0):6.1f} ms"
            f"  non-2xx {self.non_2xx}  socket errors {self.socket_errors}"
            + (f"  cpu[{cpu}]" if cpu else "")
            + (f"  steal {self.steal:.1%}" if self.steal is not None else "")
        )


def available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = ['wrk.method = "POST"', f"wrk.body = {quoted(body.decode())}"]
    lines += [f"wrk.headers[{quoted(k)}] = {quoted(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(
    url: str, script: Path, connections: int, seconds: float, label: str, threads: int = 1
) -> WrkResult:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds:.0f}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = WrkResult(label)
    if match := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result.rate = float(match.group(1))
    if match := re.search(r"(\d+) requests in", out):
        result.requests = int(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result.non_2xx = int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result.socket_errors = sum(int(g) for g in match.groups())
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE):
        result.percentiles_ms[int(pct)] = float(value) * _UNITS[unit]
    return result

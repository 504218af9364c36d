"""CPU per request of the receiver and of the bare aiohttp server, from /proc, without wrk.

    .venv/bin/python bench/receiver_cpu.py [--bootstrap HOST:PORT] [--requests 20000] [--concurrency 64]
                                           [--rounds 3] [--source customerglu] [--profile OUT.folded]

Wall-clock throughput on a shared 2-core machine moves with whatever else runs; the CPU a server process
spends per request moves much less. This starts `headwater receiver` and bench/bare_http.py in their own
processes and drives each, alternating, with a minimal keep-alive HTTP/1.1 client in this process (one
asyncio protocol per connection, pre-encoded requests, no client library: a few µs a request, so the
server is the busy side). For every round it reads the server's utime+stime from /proc/PID/stat before and
after a fixed number of 200 answers, and the machine's CPU steal from /proc/stat over the same interval.
It prints every round and the median µs of CPU a request per server; anything but a 200 is counted and
fails the run. --profile records the receiver with py-spy (raw/folded format) during its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from common import (
    bench_settings,
    body,
    broker,
    cpu_seconds,
    headwater,
    print_profile,
    py_spy,
    stop,
    write_config,
)
from receiver import RECEIVER_CODE, machine_ticks, path_and_query, run, wait_ready

POOL = 256  # distinct request bodies, cycled


def requests_for(host: str, port: int, source: str) -> list[bytes]:
    target, headers = path_and_query(source)
    out = []
    for i in range(POOL):
        payload = body(source, i, 1)
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(payload)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    return out


class Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, read its whole answer, send the next."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        request = self.load.next_request()
        if request is None:
            assert self.transport is not None
            self.transport.close()
            return
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.load.answered(int(head[9:12]))
            self.buffer = self.buffer[end + 4 + length :]
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.closed()


class Load:
    """`total` requests over `concurrency` connections; done when every connection has closed."""

    def __init__(self, requests: list[bytes], total: int, concurrency: int) -> None:
        self.requests = requests
        self.total = total
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.open = concurrency
        self.done = asyncio.get_running_loop().create_future()

    def next_request(self) -> bytes | None:
        if self.sent >= self.total:
            return None
        self.sent += 1
        return self.requests[self.sent % len(self.requests)]

    def answered(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(None)


async def drive(port: int, requests: list[bytes], total: int, concurrency: int) -> tuple[Load, float]:
    load = Load(requests, total, concurrency)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    for _ in range(concurrency):
        await loop.create_connection(lambda: Connection(load), "127.0.0.1", port)
    await load.done
    return load, time.perf_counter() - started


@dataclass
class Round:
    server: str
    requests: int
    seconds: float
    cpu_s: float
    steal: float  # share of all machine ticks that were stolen during the round
    statuses: dict[int, int]

    @property
    def us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.requests

    def line(self) -> str:
        return (
            f"  {self.server:<9} {self.requests:>7} req in {self.seconds:5.2f} s "
            f"({self.requests / self.seconds:7,.0f}"
            f" req/s)  server CPU {self.cpu_s:5.2f} s = {self.us_per_request:6.1f} us/req  steal "
            f"{self.steal:5.1%}  statuses {self.statuses}"
        )


def measure(server: str, pid: int, port: int, requests: list[bytes], total: int, concurrency: int) -> Round:
    ticks0, steal0 = machine_ticks()
    cpu0 = cpu_seconds(pid)
    load, seconds = run(drive(port, requests, total, concurrency))
    cpu1 = cpu_seconds(pid)
    ticks1, steal1 = machine_ticks()
    steal = (steal1 - steal0) / max(1, ticks1 - ticks0)
    return Round(server, total, seconds, cpu1 - cpu0, steal, load.statuses)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: a local one started for the run).")
    parser.add_argument("--requests", type=int, default=20_000, help="Requests per measured round.")
    parser.add_argument("--concurrency", type=int, default=64, help="Keep-alive connections.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds per server, alternating.")
    parser.add_argument("--source", default="customerglu", help="Endpoint of the single-event requests.")
    parser.add_argument(
        "--profile", type=Path, help="Write a py-spy raw profile of the receiver's rounds here."
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="Also measure, alternating, the receiver of this source tree "
        "(e.g. another worktree): printed as `other`.",
    )
    args = parser.parse_args()
    with (
        broker(args.bootstrap) as bootstrap,
        tempfile.TemporaryDirectory(prefix="headwater-cpu-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        settings = bench_settings(bootstrap, tmp)
        port = settings.receiver.port
        bare_port = port + 1
        config = write_config(settings, tmp / "receiver.toml")
        log = tmp / "receiver.log"
        receiver = headwater(config, "receiver", "--port", str(port), log=log)
        bare = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("bare_http.py")), str(bare_port)],
            stdin=subprocess.DEVNULL,
        )
        other = None
        if args.compare:  # the same receiver command run from another source tree (its cwd), same topics
            other_port = port + 2
            other = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "--config",
                    str(config),
                    "receiver",
                    "--port",
                    str(other_port),
                ],
                cwd=args.compare,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HEADWATER_RECEIVER_OPERATOR_PORT": "0"},  # ours has it
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        spy = None
        try:
            run(wait_ready(f"http://127.0.0.1:{port}", receiver, log))
            run(wait_ready(f"http://127.0.0.1:{bare_port}", bare, log))
            servers = {"receiver": (receiver.pid, port), "bare": (bare.pid, bare_port)}
            if other is not None:
                run(wait_ready(f"http://127.0.0.1:{other_port}", other, log))
                servers["other"] = (other.pid, other_port)
            load = {name: requests_for("127.0.0.1", p, args.source) for name, (_, p) in servers.items()}
            print(
                f"{args.requests} {args.source} requests per round over {args.concurrency} connections; "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            for name, (
                pid,
                p,
            ) in servers.items():  # warm-up: connections, templates, metadata, JIT-less caches
                measure(name, pid, p, load[name], args.requests // 4, args.concurrency)
            rounds: list[Round] = []
            for _ in range(args.rounds):
                for name, (pid, p) in servers.items():
                    if args.profile and name == "receiver":
                        spy = subprocess.Popen(
                            [
                                py_spy(),
                                "record",
                                "--pid",
                                str(pid),
                                "--rate",
                                "500",
                                "--format",
                                "raw",
                                "--output",
                                str(args.profile),
                                "--nonblocking",
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                        time.sleep(1.0)
                    result = measure(name, pid, p, load[name], args.requests, args.concurrency)
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait(30)
                        spy = None
                    rounds.append(result)
                    print(result.line(), flush=True)
            batches = run(produce_batches(f"http://127.0.0.1:{settings.receiver.operator_port}", args.source))
            served = args.requests // 4 + sum(r.requests for r in rounds if r.server == "receiver")
            print(
                f"  receiver: {batches:,.0f} record batches acknowledged for {served:,} requests "
                f"({served / max(1, batches):.1f} records a batch)"
            )
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            stop(receiver)
            stop(bare)
            if other is not None:
                stop(other)
        summary(rounds, args.requests)
        if args.profile:
            print_profile(args.profile, "receiver rounds", 25, RECEIVER_CODE)


def summary(rounds: list[Round], total: int) -> None:
    failed = sum(n for r in rounds for s, n in r.statuses.items() if s != 200) + sum(
        total - sum(r.statuses.values()) for r in rounds
    )
    names = sorted({r.server for r in rounds})
    median = {name: statistics.median(r.us_per_request for r in rounds if r.server == name) for name in names}
    rate = {
        name: statistics.median(r.requests / r.seconds for r in rounds if r.server == name) for name in names
    }
    steal = statistics.mean(r.steal for r in rounds)
    if "other" in median:
        print(
            f"median other receiver: {median['other']:.1f} us CPU, {rate['other']:,.0f} req/s; this receiver "
            f"{rate['receiver']:,.0f} req/s"
        )
    print(
        f"median CPU per request: receiver {median['receiver']:.1f} us, bare aiohttp {median['bare']:.1f} "
        f"us, "
        f"ratio bare/receiver {median['bare'] / median['receiver']:.2f}; mean steal {steal:.1%}; "
        f"not 200: {failed}"
    )
    if failed:
        raise SystemExit(1)


async def produce_batches(base: str, source: str) -> float:
    """Record batches the receiver had acknowledged: its produce latency histogram's count (`base`: its
    operator port, where /metrics is)."""
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        text = await response.text()
    wanted = f'headwater_receiver_produce_seconds_count{{source="{source}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


if __name__ == "__main__":
    main()

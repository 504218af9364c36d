"""Receiver throughput and latency vs a bare aiohttp server and a bare aiokafka producer.

    .venv/bin/python bench/receiver.py [--bootstrap HOST:PORT] [--concurrency 64] [--duration 10]
                                       [--warmup 2] [--profile] [--loadgen wrk|python] [--processes N]

With --loadgen wrk (the default when Debian's `wrk` is installed: `apt-get install -y wrk`), wrk drives
three servers from one run on the same load: the receiver, the bare aiohttp server of bench/bare_http.py
(reads the body, answers 200), and, for Kafka's share, the bare producer loop below. It prints each, the
ratio receiver / bare HTTP (target >= 0.5) and receiver / bare producer, CPU per request, and p50/p99 at
70% of the receiver's peak (open loop from vegeta when installed, see bench/vegeta.py; else the Python
open loop, latency from the scheduled send time), and the bare server's p50/p99 at the same rate: the
tail the shared machine adds by itself. The description
below is the --loadgen python mode (an aiohttp client in this process).

Starts a broker (or uses --bootstrap) and `headwater receiver --port P` in its own process; this process
is the load generator (aiohttp client, keep-alive, TCPConnector limit = concurrency).

1. Closed loop, C clients for D seconds after a warm-up: single-event requests (POST /server/v4, one
   customerglu event) and bulk requests (POST /segment/v4, 100 segment events): requests/s, events/s,
   p50/p99.
2. Bare baseline in the same run: an aiokafka producer from pipeline.kafka.clients.make_producer (the
receiver's
   acks=all idempotent settings) sends the same payloads to the same raw topics, C coroutines each
   awaiting its own ack (one payload, wait for the ack: the receiver's shape), for D seconds.
   Ratio receiver/bare for single and bulk. Target: >= 0.5 on single-event requests.
3. Open loop at 70% of the measured single-event peak: requests scheduled at fixed intervals, latency
   from the *scheduled* send time (no coordinated omission). Target: p99 < 50 ms.

Every response must be 200: non-200 answers and client errors are counted and printed, and the number of
records on raw.customerglu / raw.segment is checked against the 200s. The broker, the receiver and this
load generator share the machine's cores: the ratio is the figure that compares across machines.
--profile samples the receiver with py-spy during the closed-loop single-event phase.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import vegeta
from common import (
    bench_settings,
    body,
    broker,
    cpu_seconds,
    endpoint,
    headwater,
    print_profile,
    py_spy,
    raw_headers,
    stop,
    topic_size,
    write_config,
)
from vegeta import VegetaResult
from wrk import WrkResult, available, lua_script, run_wrk

from pipeline.config import Settings
from pipeline.kafka.clients import make_producer

SINGLE = ("customerglu", 1)
# The frames the profiles report inclusive time for: our code and the libraries on the request path.
RECEIVER_CODE = ("pipeline/", "aiohttp/", "aiokafka/", "prometheus_client/", "pydantic")
BULK = ("segment", 100)
POOL = 4096  # distinct request bodies per case, cycled


@dataclass
class Result:
    label: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, one per successful request/record
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    events_per_request: int = 1
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU share of one core over the phase

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def events(self) -> float:
        return self.rate * self.events_per_request

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def count_failures_of(self, warmup: Result) -> None:
        """A failure in the warm-up is still a failure: it counts in the measured phase's report."""
        self.statuses.update(warmup.statuses)
        self.errors.update(warmup.errors)
        self.examples.extend(warmup.examples)

    @property
    def failures(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + sum(self.errors.values())

    def line(self) -> str:
        cpu = " ".join(f"{k} {v:.0%}" for k, v in self.cpu.items())
        main = next(iter(self.cpu.values()), 0.0)  # the receiver's (or the bare loop's) share of a core
        if main:
            cpu += f"; {self.rate / main:,.0f} req per CPU-s"
        return (
            f"{self.label:<28} {self.rate:>9,.0f} req/s {self.events:>10,.0f} ev/s  p50 "
            f"{self.pct(0.50):6.1f} ms"
            f"  p99 {self.pct(0.99):6.1f} ms  ok {self.ok:>7}  failed {self.failures}"
            + (f"  cpu[{cpu}]" if cpu else "")
        )


def machine_ticks() -> tuple[int, int]:
    """(all ticks, steal ticks) of the `cpu` line of /proc/stat; steal is its 8th value."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values), values[7]


class StealMeter:
    """The share of the machine's CPU time the hypervisor gave to others (steal) since it was made."""

    def __init__(self) -> None:
        self.start = machine_ticks()

    def share(self) -> float:
        total, steal = machine_ticks()
        return (steal - self.start[1]) / max(1, total - self.start[0])


class CpuMeter:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.t0 = time.monotonic()

    def shares(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.t0
        return {name: (cpu_seconds(pid) - self.start[name]) / elapsed for name, pid in self.pids.items()}


def bodies(source: str, per_request: int) -> list[bytes]:
    return [body(source, i * per_request, per_request) for i in range(POOL)]


# --- HTTP load --------------------------------------------------------------------------------------------


async def _request(
    session: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    headers: dict[str, str],
    payload: bytes,
    result: Result,
    started: float,
) -> None:
    try:
        async with session.post(url, data=payload, params=params, headers=headers) as response:
            text = await response.read()
            status = response.status
    except Exception as exc:  # noqa: BLE001 - counted and printed
        result.errors[type(exc).__name__] += 1
        if len(result.examples) < 5:
            result.examples.append(f"{type(exc).__name__}: {exc}")
        return
    if status == 200:
        result.latencies.append(time.perf_counter() - started)
    else:
        result.statuses[status] += 1
        if len(result.examples) < 5:
            result.examples.append(f"HTTP {status}: {text[:200]!r}")


def _session(limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=60, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))


async def closed_loop(
    base: str,
    case: tuple[str, int],
    concurrency: int,
    warmup: float,
    duration: float,
    label: str,
    pids: dict[str, int],
) -> Result:
    """C clients, each posting its next request as soon as the last one is answered."""
    source, per_request = case
    path, params, headers = endpoint(source)
    payloads = bodies(source, per_request)
    url = base + path
    measured = Result(label, events_per_request=per_request)
    scratch = Result("warm-up", events_per_request=per_request)
    counter = iter(range(10**12))
    async with _session(concurrency) as session:
        phase = {"result": scratch}

        async def client() -> None:
            while not stopping.is_set():
                result = phase["result"]
                await _request(
                    session, url, params, headers, payloads[next(counter) % POOL], result, time.perf_counter()
                )

        stopping = asyncio.Event()
        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        phase["result"] = measured
        meter = CpuMeter(pids)
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        stopping.set()
        measured.seconds = time.perf_counter() - t0  # answers after this instant still count as failures only
        measured.cpu = meter.shares()
        await asyncio.gather(*tasks)
    measured.count_failures_of(scratch)
    measured.total_ok = scratch.ok + measured.ok  # type: ignore[attr-defined]
    return measured


async def open_loop(
    base: str,
    case: tuple[str, int],
    rate: float,
    duration: float,
    limit: int,
    label: str,
    pids: dict[str, int],
) -> Result:
    """Requests scheduled every 1/rate s; latency counts from the scheduled time (no coordinated omission)."""
    source, per_request = case
    path, params, headers = endpoint(source)
    payloads = bodies(source, per_request)
    url = base + path
    result = Result(label, events_per_request=per_request)
    interval = 1.0 / rate
    async with _session(limit) as session:
        # a short warm-up at the same rate opens the connections, outside the measurement
        for phase_seconds, target in ((1.0, Result("warm-up")), (duration, result)):
            tasks: set[asyncio.Task[None]] = set()
            meter = CpuMeter(pids)
            t0 = time.perf_counter()
            end = t0 + phase_seconds
            k = 0
            while True:
                scheduled = t0 + k * interval
                if scheduled >= end:
                    break
                now = time.perf_counter()
                if scheduled > now:
                    await asyncio.sleep(scheduled - now)
                task = asyncio.create_task(
                    _request(session, url, params, headers, payloads[k % POOL], target, scheduled)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                k += 1
            await asyncio.gather(*tasks)
            target.seconds = phase_seconds
            target.cpu = meter.shares()
            if target is not result:
                result.count_failures_of(target)
                warm_ok = target.ok
        result.sent = k  # type: ignore[attr-defined]
        result.total_ok = warm_ok + result.ok  # type: ignore[attr-defined]
    return result


# --- bare aiokafka baseline -------------------------------------------------------------------------------


async def bare_loop(
    settings: Settings,
    case: tuple[str, int],
    concurrency: int,
    warmup: float,
    duration: float,
    label: str,
    pids: dict[str, int],
) -> Result:
    """C coroutines, each sending one payload with make_producer() and awaiting its own ack."""
    source, per_request = case
    topic = settings.topics.raw(source)
    payloads = bodies(source, per_request)
    headers = raw_headers(source, 0)
    measured = Result(label, events_per_request=per_request)
    scratch = Result("warm-up", events_per_request=per_request)
    phase = {"result": scratch}
    counter = iter(range(10**12))
    stopping = asyncio.Event()
    producer = make_producer(settings)
    await producer.start()
    try:

        async def client() -> None:
            while not stopping.is_set():
                result = phase["result"]
                started = time.perf_counter()
                try:
                    await (await producer.send(topic, payloads[next(counter) % POOL], headers=headers))
                except Exception as exc:  # noqa: BLE001
                    result.errors[type(exc).__name__] += 1
                    continue
                result.latencies.append(time.perf_counter() - started)

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        phase["result"] = measured
        meter = CpuMeter(pids)
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        stopping.set()
        measured.seconds = time.perf_counter() - t0
        measured.cpu = meter.shares()
        await asyncio.gather(*tasks)
    finally:
        await producer.stop()
    measured.count_failures_of(scratch)
    measured.total_ok = scratch.ok + measured.ok  # type: ignore[attr-defined]
    return measured


# --- running ----------------------------------------------------------------------------------------------


async def wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if process.poll() is not None:
                raise SystemExit(
                    f"the receiver exited with {process.returncode}; see {log}:\n{log.read_text()}"
                )
            try:
                async with session.get(base + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the receiver was not ready after {timeout:.0f}s; see {log}")
            await asyncio.sleep(0.2)


def report_failures(result: Result) -> None:
    if result.failures:
        print(
            f"  !! {result.label}: {result.failures} failed: statuses {dict(result.statuses)} "
            f"errors {dict(result.errors)}"
        )
        for example in result.examples:
            print(f"     {example}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="An existing broker (default: a local one started for the run).")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="Concurrent clients / producer coroutines (the issue's load).",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds measured per phase.")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="Seconds of warm-up before each closed loop."
    )
    parser.add_argument(
        "--load", type=float, default=0.7, help="Open-loop rate as a share of the single peak."
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the receiver in the single closed loop."
    )
    parser.add_argument("--loadgen", choices=("wrk", "python"), default="wrk" if available() else "python")
    parser.add_argument(
        "--processes", type=int, default=1, help="Receiver processes (--processes of the CLI)."
    )
    args = parser.parse_args()
    if args.loadgen == "wrk":
        wrk_main(args)
        return
    c, d, w = args.concurrency, args.duration, args.warmup
    with started_receiver(
        args,
        f"concurrency {c}; {d:.0f}s per phase (+{w:.0f}s warm-up); {os.cpu_count()} "
        "CPUs shared by broker, receiver and load generator",
    ) as (settings, tmp, receiver, base):
        log = tmp / "receiver.log"
        spy = None
        try:
            run(wait_ready(base, receiver, log))
            pids = {"receiver": receiver.pid, "loadgen": os.getpid()}
            if args.profile:
                folded = tmp / "receiver.folded"
                spy = subprocess.Popen(
                    [
                        py_spy(),
                        "record",
                        "--pid",
                        str(receiver.pid),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--output",
                        str(folded),
                        "--nonblocking",
                        "--duration",
                        str(int(w + d + 1)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            single = run(closed_loop(base, SINGLE, c, w, d, "receiver single (closed)", pids))
            if spy is not None:
                spy.wait(60)
            print(single.line())
            bulk = run(closed_loop(base, BULK, c, w, d, "receiver bulk x100 (closed)", pids))
            print(bulk.line())
            bare_pids = {"bare": os.getpid()}
            bare_single = run(bare_loop(settings, SINGLE, c, w, d, "bare producer single", bare_pids))
            print(bare_single.line())
            bare_bulk = run(bare_loop(settings, BULK, c, w, d, "bare producer bulk x100", bare_pids))
            print(bare_bulk.line())
            target_rate = args.load * single.rate
            opened = run(
                open_loop(
                    base,
                    SINGLE,
                    target_rate,
                    d,
                    max(256, 4 * c),
                    f"receiver single (open {args.load:.0%})",
                    pids,
                )
            )
            print(opened.line() + f"  (target {target_rate:,.0f} req/s, scheduled {opened.sent})")
            stored = {s: run(topic_size(settings, settings.topics.raw(s))) for s in (SINGLE[0], BULK[0])}
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            stop(receiver)

        print(f"\nload average at the end {os.getloadavg()[0]:.1f} (CPU shares above are of one core)")
        for result in (single, bulk, opened, bare_single, bare_bulk):
            report_failures(result)
        http_single = single.total_ok + opened.total_ok  # type: ignore[attr-defined]
        expect = {
            SINGLE[0]: http_single + bare_single.total_ok,  # type: ignore[attr-defined]
            BULK[0]: bulk.total_ok + bare_bulk.total_ok,
        }  # type: ignore[attr-defined]
        for source, count in stored.items():
            verdict = "ok" if count == expect[source] else "MISMATCH"
            print(f"records on raw.{source}: {count} (200 answers + bare acks: {expect[source]}) {verdict}")

        ratio_single = single.rate / bare_single.rate if bare_single.rate else float("nan")
        ratio_bulk = bulk.rate / bare_bulk.rate if bare_bulk.rate else float("nan")
        p99_ok = opened.pct(0.99) < 50 and opened.failures == 0
        print()
        print("summary")
        print(
            f"  {'case':<24} {'req/s':>9} {'events/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'bare rec/s':>10} "
            f"{'bare p50':>8} {'bare p99':>8} {'ratio':>6}"
        )
        for name, r, b, ratio in (
            (f"single (closed, C={c})", single, bare_single, ratio_single),
            (f"bulk x100 (closed, C={c})", bulk, bare_bulk, ratio_bulk),
        ):
            print(
                f"  {name:<24} {r.rate:>9,.0f} {r.events:>10,.0f} {r.pct(0.5):>7.1f} {r.pct(0.99):>7.1f} "
                f"{b.rate:>10,.0f} {b.pct(0.5):>8.1f} {b.pct(0.99):>8.1f} {ratio:>6.2f}"
            )
        print(
            f"  {f'single (open, {round(args.load * 100)}%)':<24} {opened.rate:>9,.0f} "
            f"{opened.events:>10,.0f} "
            f"{opened.pct(0.5):>7.1f} {opened.pct(0.99):>7.1f}"
        )
        print(
            f"  target ratio >= 0.5 on single: {'MET' if ratio_single >= 0.5 else 'NOT MET'} "
            f"({ratio_single:.2f}); "
            f"p99 < 50 ms at {args.load:.0%} of peak: {'MET' if p99_ok else 'NOT MET'} "
            f"({opened.pct(0.99):.1f} ms)"
        )
        failures = sum(r.failures for r in (single, bulk, opened))
        print(f"  non-200 / failed HTTP requests: {failures}")

        if spy is not None:
            print_profile(tmp / "receiver.folded", "receiver, single closed loop", 20, RECEIVER_CODE)


@contextlib.contextmanager
def started_receiver(
    args: argparse.Namespace, describe: str
) -> Iterator[tuple[Settings, Path, subprocess.Popen[bytes], str]]:
    """A broker (or --bootstrap), fresh topics and `headwater receiver` in its own process, its log in
    tmp/receiver.log: (settings, tmp, receiver process, base URL). The receiver is stopped on exit."""
    with (
        broker(args.bootstrap) as bootstrap,
        tempfile.TemporaryDirectory(prefix="headwater-bench-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        settings = bench_settings(bootstrap, tmp)
        port = settings.receiver.port
        config = write_config(settings, tmp / "receiver.toml")
        print(
            f"broker {bootstrap}; receiver on port {port}, {args.processes} process(es); {describe}; "
            f"load average {os.getloadavg()[0]:.1f} before the run"
        )
        receiver = headwater(
            config,
            "receiver",
            "--port",
            str(port),
            "--processes",
            str(args.processes),
            log=tmp / "receiver.log",
        )
        try:
            yield settings, tmp, receiver, f"http://127.0.0.1:{port}"
        finally:
            stop(receiver)


def wrk_main(args: argparse.Namespace) -> None:
    """Receiver, bare aiohttp server and bare producer on the same load, from one run."""
    c, d, w = args.concurrency, args.duration, args.warmup
    with started_receiver(
        args,
        f"wrk -t1 -c{c}, {d:.0f}s per phase (+{w:.0f}s warm-up); {os.cpu_count()} "
        "CPUs shared by broker, servers and wrk",
    ) as (settings, tmp, receiver, base):
        log = tmp / "receiver.log"
        bare_port = settings.receiver.port + 1
        bare = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("bare_http.py")), str(bare_port)],
            stdin=subprocess.DEVNULL,
        )
        results: dict[str, WrkResult] = {}
        spy = None
        steal = StealMeter()
        try:
            run(wait_ready(base, receiver, log))
            run(wait_ready(f"http://127.0.0.1:{bare_port}", bare, log))
            receiver_pids = receiver_processes(receiver.pid, args.processes)
            for case, name in ((SINGLE, "single"), (BULK, "bulk x100")):
                source, per_request = case
                target, headers = path_and_query(source)
                script = lua_script(tmp / f"{source}.lua", bodies(source, per_request)[0], headers)
                for label, url, pids in (
                    (f"receiver {name}", base + target, receiver_pids),
                    (
                        f"bare aiohttp {name}",
                        f"http://127.0.0.1:{bare_port}{target}",
                        {"bare_http": bare.pid},
                    ),
                ):
                    run_wrk(url, script, c, w, "warm-up")
                    meter = CpuMeter({**pids, "wrk+broker": os.getpid()})
                    if args.profile and label == "receiver single":
                        spy = subprocess.Popen(
                            [
                                py_spy(),
                                "record",
                                "--pid",
                                str(receiver.pid),
                                "--rate",
                                "250",
                                "--format",
                                "raw",
                                "--output",
                                str(tmp / "receiver.folded"),
                                "--nonblocking",
                                "--duration",
                                str(int(d)),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    phase_steal = StealMeter()
                    result = run_wrk(url, script, c, d, label)
                    result.steal = phase_steal.share()
                    shares = meter.shares()
                    shares.pop("wrk+broker")
                    result.cpu = {"servers": sum(shares.values())}
                    result.events_per_request = per_request
                    results[label] = result
                    print(result.line())
                    if spy is not None:
                        spy.wait(60)
            bare_single = run(
                bare_loop(settings, SINGLE, c, w, d, "bare producer single", {"bare": os.getpid()})
            )
            print(bare_single.line())
            peak = results["receiver single"].rate
            opened = open_loop_at(args, base, tmp, args.load * peak, d, receiver_pids)
            # The same rate against the bare server: the tail the machine itself adds (the generator, the
            # broker and the server share its cores), next to the receiver's.
            bare_opened = open_loop_at(
                args,
                f"http://127.0.0.1:{bare_port}",
                tmp,
                args.load * peak,
                d,
                {"bare_http": bare.pid},
                who="bare aiohttp",
            )
            stored = run(topic_size(settings, settings.topics.raw(SINGLE[0])))
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            stop(receiver)
            stop(bare)
        single, bare_http = results["receiver single"], results["bare aiohttp single"]
        bulk, bare_http_bulk = results["receiver bulk x100"], results["bare aiohttp bulk x100"]
        ratio = single.rate / bare_http.rate if bare_http.rate else float("nan")
        print(
            f"\nload average at the end {os.getloadavg()[0]:.1f}; CPU steal during the run "
            f"{steal.share():.1%}"
        )
        print("summary")
        print(
            f"  receiver single {single.rate:,.0f} req/s vs bare aiohttp {bare_http.rate:,.0f} req/s: "
            f"ratio {ratio:.2f} (target >= 0.5: {'MET' if ratio >= 0.5 else 'NOT MET'})"
        )
        print(
            f"  receiver bulk x100 {bulk.rate:,.0f} req/s vs bare aiohttp {bare_http_bulk.rate:,.0f} req/s: "
            f"ratio {bulk.rate / bare_http_bulk.rate if bare_http_bulk.rate else float('nan'):.2f}"
        )
        print(
            f"  receiver single vs bare producer {bare_single.rate:,.0f} rec/s: "
            f"ratio {single.rate / bare_single.rate if bare_single.rate else float('nan'):.2f}"
        )
        cpu = single.cpu["servers"]
        print(
            f"  receiver CPU per request {1e6 * cpu / single.rate:,.0f} us; {single.rate / cpu:,.0f} req/s "
            f"per core"
            if single.rate and cpu
            else "  receiver CPU per request: n/a"
        )
        p50, p99 = opened_percentiles(opened)
        p99_ok = p99 < 50 and opened.failures == 0
        print(
            f"  at {args.load:.0%} of peak ({opened.label.split('(')[-1].rstrip(')')}): p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms (target p99 < 50 ms: {'MET' if p99_ok else 'NOT MET'}); "
            f"sent {opened.rate:,.0f} req/s, {opened.failures} not 200"
        )
        bare_p50, bare_p99 = opened_percentiles(bare_opened)
        print(
            f"  bare aiohttp at the same rate: p50 {bare_p50:.1f} ms, p99 {bare_p99:.1f} ms; "
            f"sent {bare_opened.rate:,.0f} req/s, {bare_opened.failures} not 200"
        )
        expected = sum(
            r.ok for r in results.values() if r.label.endswith("single") and r.label.startswith("receiver")
        )
        print(
            f"  records on raw.{SINGLE[0]}: {stored} (>= measured 200s {expected} + warm-up + open loop "
            f"{opened.ok} + bare producer {bare_single.total_ok})"
        )  # type: ignore[attr-defined]
        if isinstance(opened, Result):
            report_failures(opened)
        elif opened.errors:
            print(f"  !! open loop errors: {opened.errors}")
        print_profile(tmp / "receiver.folded", "receiver, single closed loop", 20, RECEIVER_CODE)


def open_loop_at(
    args: argparse.Namespace,
    base: str,
    tmp: Path,
    rate: float,
    seconds: float,
    pids: dict[str, int],
    who: str = "receiver",
) -> Result | VegetaResult:
    """Single-event requests at a fixed rate: vegeta when installed (it holds the rate), else the Python
    loop."""
    label = f"{who} single (open {args.load:.0%}"
    found = vegeta.binary()
    if found is None:
        print(
            "  (vegeta not installed: the Python open loop below may not hold the rate; see bench/vegeta.py)"
        )
        opened = run(
            open_loop(base, SINGLE, rate, seconds, max(256, 4 * args.concurrency), label + ")", pids)
        )
        print(opened.line() + f"  (target {rate:,.0f} req/s, scheduled {opened.sent})")
        return opened
    target, headers = path_and_query(SINGLE[0])
    body_file = tmp / "open-loop-body.json"
    body_file.write_bytes(bodies(*SINGLE)[0])
    script = vegeta.targets(tmp / "open-loop.targets", base + target, body_file, headers)
    vegeta.attack(found, script, rate, 1, "warm-up")
    meter = CpuMeter(pids)
    before = os.times()
    steal = StealMeter()
    opened = vegeta.attack(found, script, rate, seconds, label + ", vegeta)")
    opened.steal = steal.share()
    opened.cpu = meter.shares()
    after = os.times()  # vegeta is a reaped child: its CPU shows in the children's times
    spent = after.children_user + after.children_system - before.children_user - before.children_system
    opened.cpu["vegeta"] = spent / max(after.elapsed - before.elapsed, 1e-9)
    print(opened.line())
    return opened


def path_and_query(source: str) -> tuple[str, dict[str, str]]:
    """The request target (path and query string) and headers of a source's endpoint, for wrk and vegeta."""
    path, params, headers = endpoint(source)
    return path + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""), headers


def opened_percentiles(opened: Result | VegetaResult) -> tuple[float, float]:
    if isinstance(opened, Result):
        return opened.pct(0.5), opened.pct(0.99)
    return opened.percentiles_ms.get(50, 0.0), opened.percentiles_ms.get(99, 0.0)


def receiver_processes(pid: int, processes: int) -> dict[str, int]:
    """The process(es) serving: the receiver itself, or its --processes children."""
    if processes == 1:
        return {"receiver": pid}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {"supervisor": pid, **{f"receiver{i}": int(child) for i, child in enumerate(children)}}


def run(coro):  # type: ignore[no-untyped-def]
    """asyncio.run on uvloop when installed (the receiver runs on uvloop too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()

"""What the benchmarks share: a broker, settings on fresh topics, vendor payloads, processes.

Every benchmark measures Headwater and a bare baseline in the same run on the same broker, and
prints the ratio, so that figures from different machines compare by their ratios.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncGenerator, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from rigs.kafka import die_with_parent, start_local_broker, toml_text  # noqa: E402

from pipeline.config import Settings  # noqa: E402
from pipeline.kafka.local import free_port  # noqa: E402
from pipeline.kafka.reading import Record, TopicReader, end_offsets  # noqa: E402

TENANT = {
    "id": "bench",
    "write_keys": ["wk_bench_1"],
    "usermaven_tokens": ["ak_bench.st_bench"],
    "webengage": {"license_code": "~bench", "secret_key": "whsec_bench"},
}
WEBENGAGE_SECRET = hashlib.md5(b"~bench:whsec_bench").hexdigest()


def broker_parent() -> str | None:
    """Where the benchmark's own broker keeps its log: $HEADWATER_BENCH_BROKER_DIR, else /dev/shm when it
    is a writable tmpfs, else the system temp dir. A throwaway log in memory keeps the broker's disk work
    off the shared CPU: on an ext4 host (kernel 6.18) perf showed the broker's request handlers spending
    40 % of their CPU in the kernel zeroing page-cache folios of its mmapped index files, bursts of 1-1.9
    cores that starved whichever phase made the broker write more (docs/benchmarks.md, "Worker")."""
    chosen = os.environ.get("HEADWATER_BENCH_BROKER_DIR")
    if chosen:
        return chosen
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return str(shm)
    return None


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """The given bootstrap, or a local single-node broker in a temp dir (broker_parent) for the run."""
    if bootstrap:
        yield bootstrap
        return
    with tempfile.TemporaryDirectory(prefix="headwater-bench-", dir=broker_parent()) as tmp:
        print(f"benchmark broker: {tmp}", flush=True)
        local = start_local_broker(Path(tmp) / "kafka")
        try:
            yield local.bootstrap
        finally:
            local.down()


def bench_settings(bootstrap: str, tmp: Path, partitions: int = 6, **sections: Any) -> Settings:
    """Settings on topics no earlier run used."""
    run = f"b{uuid.uuid4().hex[:8]}"
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "partitions": partitions},
        "local_kafka": {"enabled": False},
        "topics": {
            "raw_prefix": f"{run}.raw.",
            "canonical": f"{run}.canonical",
            "dlq": f"{run}.dlq",
            "keyed": f"{run}.keyed",
            "replay_results": f"{run}.replay",
            "rewards": f"{run}.rewards",
            "rewards_dlq": f"{run}.rewards-dlq",
            "rewards_deliveries": f"{run}.rewards-deliveries",
        },
        "worker": {"app_id": run, "data_dir": str(tmp / run), "web_port": 0},
        "receiver": {"port": free_port(), "operator_port": free_port()},  # /metrics: the operator port
        "tenants": [TENANT],
    }
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    return Settings.model_validate(doc)


def write_config(settings: Settings, path: Path) -> Path:
    path.write_text(toml_text(settings))
    return path


def headwater(
    config: Path, *args: str, log: Path | None = None, tree: Path | None = None
) -> subprocess.Popen[bytes]:
    """A `headwater` subcommand in its own process, killed by the kernel if this one dies; with `tree`,
    the code of that checkout (`python -m` puts its working directory first on sys.path)."""
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--config", str(config), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=tree,
        preexec_fn=die_with_parent,
    )  # a killed benchmark leaves no worker behind


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def topic_size(settings: Settings, topic: str) -> int:
    """Records on a topic (sum of end offsets; our topics are never compacted or truncated here)."""
    return sum((await end_offsets(settings, topic)).values())


class RecordCounter:
    """Counts the records of a topic as a read_committed reader sees them (every reader of ours does).

    End offsets over-count a transactional topic such as events.canonical: each commit marker takes an
    offset too, so only reading tells how many events are there."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic, self.count = settings, topic, 0
        self._reader = TopicReader(settings)
        self._fetches: AsyncGenerator[list[Record], None] | None = None

    async def __aenter__(self) -> RecordCounter:
        await self._reader.start()
        while not await self._reader.partitions(self.topic):  # the worker may not have created it yet
            await asyncio.sleep(0.2)
        firsts = {p: first for p, (first, _) in (await self._reader.bounds(self.topic)).items()}
        self._fetches = self._reader.follow(self.topic, firsts, max_records=10_000)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._fetches is not None:
            await self._fetches.aclose()
        await self._reader.stop()

    async def records(self, timeout_s: float = 0.25) -> list[Any]:
        """The records that have arrived (waiting up to about timeout_s); they join the running count."""
        assert self._fetches is not None, "use RecordCounter as `async with`"
        deadline = asyncio.get_running_loop().time() + timeout_s
        arrived: list[Any] = []
        while not arrived and asyncio.get_running_loop().time() < deadline:
            arrived = await anext(self._fetches)
        self.count += len(arrived)
        return arrived

    async def read(self, timeout_s: float = 0.25) -> int:
        """Read what has arrived (waiting up to timeout_s); the running count."""
        await self.records(timeout_s)
        return self.count


async def produce_all(
    settings: Settings, records: Iterable[tuple[str, bytes, list[tuple[str, bytes]]]]
) -> None:
    """Write (topic, value, headers) records with the receiver's producer settings, acks awaited per 5,000."""
    from pipeline.kafka.clients import make_producer

    producer = make_producer(settings, linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    try:
        acks = []
        for topic, value, headers in records:
            acks.append(await producer.send(topic, value, headers=headers))
            if len(acks) >= 5000:
                await asyncio.gather(*acks)
                acks.clear()
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def profile_top(
    folded: Path, top: int, inclusive_of: tuple[str, ...]
) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """(own-time share of every frame, inclusive share of frames whose file matches `inclusive_of`) in a
    py-spy raw (folded) profile."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        n = int(samples)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            if any(p in frame for p in inclusive_of):
                inclusive[frame] += n
    return (
        [(n / max(1, total), f) for f, n in own.most_common(top)],
        [(n / max(1, total), f) for f, n in inclusive.most_common(top)],
    )


def print_profile(folded: Path, what: str, top: int, inclusive_of: tuple[str, ...]) -> None:
    """The top functions of a py-spy raw profile by own time and by inclusive time (frames of
    `inclusive_of`)."""
    if not folded.exists():
        return
    own, inclusive = profile_top(folded, top, inclusive_of)
    print(f"\npy-spy, {what}: top functions by own time")
    for share, frame in own:
        print(f"  {share:6.1%}  {frame}")
    print(f"by inclusive time ({', '.join(inclusive_of)})")
    for share, frame in inclusive:
        print(f"  {share:6.1%}  {frame}")


def py_spy() -> str:
    """The py-spy executable, installed into this environment on first use."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- vendor payloads ------------------------------------------------------------------------------------
# One event per source in its own shape; `bulk` items go in one request where the source batches.


def _segment(i: int) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": f"seg-{i}",
        "userId": f"u{i % 1000}",
        "timestamp": "2024-03-01T12:00:00.800Z",
        "properties": {"revenue": i % 97, "currency": "INR"},
        "context": {"library": {"name": "analytics.js"}, "ip": "10.0.0.1"},
    }


def _amplitude(i: int) -> dict[str, Any]:
    return {
        "$insert_id": f"amp-{i}",
        "event_type": "Song Played",
        "user_id": f"u{i % 1000}",
        "event_time": "2024-03-01 12:00:00.000000",
        "event_properties": {"genre": "jazz", "n": i},
    }


def _moengage(i: int) -> dict[str, Any]:
    return {
        "event_name": "Email Clicked",
        "event_uuid": f"moe-{i}",
        "event_time": 1709294400 + i % 1000,
        "uid": f"u{i % 1000}",
        "event_attributes": {"campaign": "spring", "n": i},
    }


def _clevertap_profile(i: int) -> dict[str, Any]:
    return {"identity": f"u{i % 1000}", "objectId": f"__obj{i}", "profileData": {"plan": "pro"}}


def _usermaven(i: int) -> dict[str, Any]:
    return {
        "api_key": "ak_bench",
        "event_id": f"um-{i}",
        "event_type": "signed_up",
        "_timestamp": 1709294400000 + i,
        "user": {"id": f"u{i % 1000}"},
        "event_attributes": {"n": i},
    }


def _customerglu(i: int) -> dict[str, Any]:
    return {
        "event_id": f"cg-{i}",
        "event_name": "kyc_completed",
        "user_id": f"u{i % 1000}",
        "timestamp": "2024-03-01T12:00:00Z",
        "event_properties": {"level": "full", "n": i},
    }


def _webengage(i: int) -> dict[str, Any]:
    return {
        "event_name": "push_notification_accepted",
        "event_time": "2024-03-01T12:00:00+0000",
        "license_code": "~bench",
        "user_id": f"u{i % 1000}@example.com",
        "event_data": {"n": i},
    }


def body(source: str, first: int, count: int) -> bytes:
    """The request body of `count` events starting at index `first` (count > 1 only where the source
    batches)."""
    items = range(first, first + count)
    match source:
        case "customerglu":
            return orjson.dumps(_customerglu(first))
        case "amplitude":
            return orjson.dumps(_amplitude(first))
        case "webengage":
            return orjson.dumps(_webengage(first))
        case "segment":
            return orjson.dumps([_segment(i) for i in items] if count > 1 else _segment(first))
        case "moengage":
            return orjson.dumps(
                {
                    "app_name": "Bench",
                    "source": "MOENGAGE",
                    "moe_request_id": f"r{first}",
                    "events": [_moengage(i) for i in items],
                }
            )
        case "clevertap":
            return orjson.dumps(
                {
                    "targetId": 1700000001,
                    "key_values": {"event_name": "Trial Started", "event_id": f"ct-{first}"},
                    "profiles": [_clevertap_profile(i) for i in items],
                }
            )
        case "usermaven":
            return orjson.dumps([_usermaven(i) for i in items] if count > 1 else _usermaven(first))
    raise ValueError(source)


SINGLE_SOURCES = ("customerglu", "segment", "moengage", "amplitude", "clevertap", "webengage", "usermaven")
# The sources whose requests carry many events with their own ids (a CleverTap webhook is one event sent
# to many profiles: its profiles share the event id, so dedup rightly keeps one of them).
BULK_SOURCES = ("segment", "moengage", "usermaven")


def endpoint(source: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(path, query, headers) of an authenticated request to the receiver."""
    json = {"Content-Type": "application/json"}
    key = {"X-API-KEY": "wk_bench_1", **json}
    return {
        "customerglu": ("/server/v4", {}, key),
        "segment": ("/segment/v4", {}, key),
        "moengage": ("/v3/moengage", {}, key),
        "amplitude": ("/amplitude/v4", {}, key),
        "clevertap": ("/clevertap/v4", {}, key),
        "webengage": (
            "/webengage/v4",
            {"licenseCode": "~bench", "secret": WEBENGAGE_SECRET, "eventType": "push"},
            {"x-request-id": "bench", **json},
        ),
        "usermaven": ("/api/v1/s2s/event", {"token": "ak_bench.st_bench"}, json),
    }[source]


def raw_headers(source: str, index: int) -> list[tuple[str, bytes]]:
    """The headers the receiver writes, for records the benchmark preloads itself."""
    from pipeline.records import RawHeaders, new_request_id, utc_now

    extra: dict[str, Any] = {}
    if source == "webengage":
        extra = {"vendor": {"request_id": f"we-{index}", "event_type": "push", "license_code": "~bench"}}
    elif source == "usermaven":
        extra = {"vendor": {"api_key": "ak_bench"}}
    return RawHeaders(
        tenant="bench",
        source=source,
        received_at=utc_now(),
        request_id=new_request_id(),
        content_type="application/json",
        **extra,
    ).to_kafka()

"""`headwater import`: request bodies from files into raw.<source>, as the receiver would have written them.

History a team brings (exports of past events) goes straight to Kafka instead of through the receiver:
one raw record per body with the receiver's headers (tenant, source, received_at, request id, content
type, the source's vendor metadata) plus `hw-imported: <import id>`, so the worker treats the records
like any others and anyone can tell them apart. Events keep their own timestamps (the adapters read
them from the bodies).

- Input: a file or a directory (its *.ndjson, *.jsonl and *.json files, sorted by path). NDJSON: one
  body per line (blank lines skipped); JSON: the whole file is one body.
- Rate: at most `--rate` events per second (a body's events: an array's elements, or those of the arrays
  of a top-level object), so the import takes a known share of the workers' capacity and never the
  receiver's fair shares.
- Resume: records are sent in chunks (at most a second's worth); once Kafka has acknowledged a whole
  chunk, the position after it (file, byte offset) is written to the state file with, per partition,
  the offset past the import's last acknowledged record. That position is the resume point. After
  Ctrl-C the chunk in flight is acknowledged first, so nothing is sent twice. After a crash the resumed
  run first reads the raw topic from those offsets and moves the resume point past the bodies the
  crashed run wrote (each record's request id holds its body's position); a body it cannot account for
  is sent again, and the dedup stage drops its events (every record of an import carries the import's
  start time as received_at, so even events without an id fingerprint the same).
- A body over receiver.max_body_bytes is not written (the receiver would answer 413); each is reported
  with its position.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from pipeline.adapting import credential_digest
from pipeline.config import Settings, Tenant
from pipeline.errors import HeadwaterError
from pipeline.kafka.clients import broker_errors, ensure_topics, make_producer
from pipeline.kafka.reading import TopicReader
from pipeline.records import RawHeaders, utc_now

log = logging.getLogger(__name__)
IMPORTED_HEADER = "hw-imported"  # the import id: a record written by `headwater import`, not the receiver
SUFFIXES = (".ndjson", ".jsonl", ".json")
STATE_DIR = Path(".headwater/imports")


class ImportError_(HeadwaterError):  # noqa: N801 - `ImportError` is Python's
    """The import cannot start (bad input path, unknown tenant or source, a state file of another import)."""


class ImportState(BaseModel):
    """What the state file holds: the import's identity and its resume point."""

    model_config = ConfigDict(extra="forbid")

    import_id: str
    tenant: str
    source: str
    input: str
    started_at: datetime
    file_index: int = 0  # the resume point: the next body starts in files[file_index] at byte `offset`
    offset: int = 0
    records: int = 0  # acknowledged so far
    bytes: int = 0
    events: int = 0
    refused: list[str] = []  # positions of bodies over receiver.max_body_bytes
    # Per partition of raw.<source>: where records this import may have written begin (the end offsets at
    # its start, then past each acknowledged record). A resume reads from there what a crashed run wrote.
    written: dict[int, int] = {}
    done: bool = False


@dataclass
class Body:
    file_index: int
    end: int  # byte offset just past this body (and its newline) in its file
    value: bytes
    where: str  # file:line, for messages


@dataclass
class Progress:
    """What the progress line shows: records, bytes, events/s and the ETA from the bytes left."""

    total_bytes: int
    done_bytes: int
    records: int
    events: int
    started: float = field(default_factory=time.monotonic)
    events_at_start: int = 0
    bytes_at_start: int = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.events - self.events_at_start) / elapsed
        byte_rate = (self.done_bytes - self.bytes_at_start) / elapsed
        left = max(self.total_bytes - self.done_bytes, 0)
        eta = f"{left / byte_rate:.0f}s" if byte_rate > 0 else "?"
        share = 100 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (
            f"{share:5.1f}%  {self.records:,} records  {self.events:,} events  "
            f"{self.done_bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB  {rate:,.0f} events/s  ETA {eta}"
        )


def input_files(path: Path) -> list[Path]:
    """The files an import reads: the path itself, or a directory's NDJSON/JSON files sorted by path."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if files:
            return files
        raise ImportError_(f"{path}: no {', '.join(SUFFIXES)} files in it")
    raise ImportError_(f"{path}: no such file or directory")


def bodies(files: list[Path], file_index: int, offset: int) -> Iterator[Body]:
    """Every body from the resume point on: NDJSON lines, or whole JSON files."""
    for index in range(file_index, len(files)):
        path = files[index]
        start = offset if index == file_index else 0
        if path.suffix == ".json":
            if start == 0:
                value = path.read_bytes()
                yield Body(index, len(value), value, str(path))
            continue
        with path.open("rb") as handle:
            handle.seek(start)
            position = start
            for line in handle:
                position += len(line)
                value = line.strip()
                if value:
                    yield Body(index, position, value, f"{path}:byte {position - len(line)}")


def count_events(body: bytes) -> int:
    """Events in a body, as the rate counts them: an array's elements, the elements of the arrays of a
    top-level object (a MoEngage `events`, CleverTap `profiles`), else one."""
    try:
        doc = orjson.loads(body.removeprefix(b"\xef\xbb\xbf"))
    except orjson.JSONDecodeError:
        return 1
    if isinstance(doc, list):
        return max(len(doc), 1)
    if isinstance(doc, dict):
        return max(sum(len(v) for v in doc.values() if isinstance(v, list)), 1)
    return 1


def state_path(tenant: str, source: str, path: Path) -> Path:
    """The default state file of an import of `path` for a tenant and source."""
    digest = hashlib.sha256(f"{tenant}\0{source}\0{path.resolve()}".encode()).hexdigest()[:16]
    return STATE_DIR / f"{source}-{tenant}-{digest}.json"


def vendor_meta(source: str, tenant: Tenant, given: dict[str, str]) -> dict[str, str]:
    """The vendor headers the receiver would have written: given ones, and for Usermaven those of the
    tenant's first token (its API-key half and the whole token's digest)."""
    vendor = dict(given)
    if source == "usermaven" and tenant.usermaven_tokens and "api_key" not in vendor:
        token = tenant.usermaven_tokens[0].get_secret_value()
        vendor["api_key"] = token.split(".", 1)[0]
        vendor["token_sha256"] = credential_digest(token)
    return vendor


def load_state(path: Path) -> ImportState | None:
    try:
        return ImportState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ImportError_(
            f"{path}: not an import state file ({exc.__class__.__name__}); remove it"
        ) from None


def save_state(path: Path, state: ImportState) -> None:
    """Write the state file atomically (a crash leaves the old or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(state.model_dump_json(indent=2))
    partial.replace(path)


async def run_import(
    settings: Settings,
    state: ImportState,
    files: list[Path],
    state_file: Path,
    vendor: dict[str, str],
    rate: float,
    stop: asyncio.Event,
    show: Callable[[Progress], None],
    chunk_records: int = 1000,
    chunk_bytes: int = 8 * 1024 * 1024,
    chunk_seconds: float = 1.0,
) -> ImportState:
    """Send every body from the state's resume point on; return the state (done, or stopped)."""
    topic = settings.topics.raw(state.source)
    total = sum(p.stat().st_size for p in files)
    done_before = sum(p.stat().st_size for p in files[: state.file_index]) + state.offset
    progress = Progress(total, done_before, state.records, state.events, events_at_start=state.events)
    progress.bytes_at_start = done_before
    limit = settings.receiver.max_body_bytes
    await ensure_topics(settings, [topic])
    async with TopicReader(settings) as reader:
        if not state.written:  # a new import: nothing of it is on the topic before these offsets
            state.written = await reader.end_offsets(topic)
            save_state(state_file, state)
        else:
            await _skip_what_was_written(reader, topic, state, files)
    progress.records, progress.events, progress.events_at_start = state.records, state.events, state.events
    progress.done_bytes = progress.bytes_at_start = _position_bytes(files, state)
    producer = make_producer(settings, linger_ms=20, max_batch_size=1024 * 1024)
    async with broker_errors("starting the import's producer"):
        await producer.start()
    started = time.monotonic()
    sent_events = 0  # since this run started, for the rate
    try:
        pending: list[asyncio.Future[Any]] = []
        chunk_size = 0
        chunk_events = 0
        last: Body | None = None
        last_shown = 0.0
        chunk_started = time.monotonic()
        for body in bodies(files, state.file_index, state.offset):
            if stop.is_set():
                break
            if len(body.value) > limit:
                state.refused.append(body.where)
            else:
                events = count_events(body.value)
                wait = started + sent_events / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                headers = RawHeaders(
                    tenant=state.tenant,
                    source=state.source,
                    received_at=state.started_at,
                    request_id=f"{state.import_id}:{body.file_index}:{body.end}",
                    content_type="application/json",
                    vendor=vendor,
                ).to_kafka()
                headers.append((IMPORTED_HEADER, state.import_id.encode()))
                async with broker_errors("importing"):
                    pending.append(await producer.send(topic, body.value, headers=headers))
                sent_events += events
                chunk_events += events
                chunk_size += len(body.value)
            last = body
            full = len(pending) >= chunk_records or chunk_size >= chunk_bytes
            if full or time.monotonic() - chunk_started >= chunk_seconds:
                await _acknowledged(pending, state, last, chunk_size, chunk_events, state_file)
                progress.records, progress.events = state.records, state.events
                progress.done_bytes = _position_bytes(files, state)
                pending, chunk_size, chunk_events = [], 0, 0
                chunk_started = time.monotonic()
            if time.monotonic() - last_shown > 0.5:
                show(progress)
                last_shown = time.monotonic()
        if last is not None:
            await _acknowledged(pending, state, last, chunk_size, chunk_events, state_file)
        state.done = not stop.is_set()
        save_state(state_file, state)
        progress.records, progress.events = state.records, state.events
        progress.done_bytes = _position_bytes(files, state)
        show(progress)
        return state
    finally:
        await producer.stop()


async def _acknowledged(
    pending: list[asyncio.Future[Any]], state: ImportState, last: Body, size: int, events: int, path: Path
) -> None:
    """Wait until Kafka has acknowledged every record of the chunk, then move the resume point past it."""
    async with broker_errors("importing"):
        written = await asyncio.gather(*pending)
    for metadata in written:
        state.written[metadata.partition] = max(state.written.get(metadata.partition, 0), metadata.offset + 1)
    state.file_index, state.offset = last.file_index, last.end
    state.records += len(pending)
    state.bytes += size
    state.events += events
    save_state(path, state)


async def _skip_what_was_written(
    reader: TopicReader, topic: str, state: ImportState, files: list[Path]
) -> None:
    """Move the resume point past the bodies a crashed run wrote after its last saved chunk: the records
    of this import after `state.written`, recognized by hw-imported and their request id (which holds
    the body's position). Only the unbroken run of bodies after the resume point is skipped; a body after
    a gap is sent again (dedup drops its events)."""
    ends = await reader.end_offsets(topic)
    ranges = {p: (state.written.get(p, 0), end) for p, end in ends.items()}
    found: set[str] = set()
    own = state.import_id.encode()
    async for records in reader.chunks(topic, ranges):
        for record in records:
            if (IMPORTED_HEADER, own) in (record.headers or ()):
                found.update(v.decode() for k, v in record.headers if k == "hw-request-id")
    if not found:
        return
    skipped = 0
    for body in bodies(files, state.file_index, state.offset):
        if len(body.value) <= reader.settings.receiver.max_body_bytes:
            if f"{state.import_id}:{body.file_index}:{body.end}" not in found:
                break
            state.records += 1
            state.bytes += len(body.value)
            state.events += count_events(body.value)
            skipped += 1
        state.file_index, state.offset = body.file_index, body.end
    log.info("the previous run wrote %d record(s) after its last saved point; resuming after them", skipped)


def _position_bytes(files: list[Path], state: ImportState) -> int:
    return sum(p.stat().st_size for p in files[: state.file_index]) + state.offset


def new_state(tenant: str, source: str, path: Path) -> ImportState:
    return ImportState(
        import_id=f"imp-{uuid.uuid4().hex[:12]}",
        tenant=tenant,
        source=source,
        input=str(path.resolve()),
        started_at=utc_now(),
    )


def terminal_progress() -> Callable[[Progress], None]:
    """One progress line rewritten in place on a terminal; a line every 5 s otherwise (logs, CI)."""
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(progress: Progress) -> None:
        if tty:
            sys.stderr.write("\r" + progress.line() + "  ")
            sys.stderr.flush()
        elif time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            sys.stderr.write(progress.line() + "\n")

    return show

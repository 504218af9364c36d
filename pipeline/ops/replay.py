"""Replay: read a range of raw.<source> and feed it through the pipeline again.

The replay process runs the normalize stage itself (current adapters, in-process) and hands the
candidates to the running workers' dedup stage, tagged with a replay id; dead letters go to events.dlq
as usual (same deterministic ids as the first time). The dedup stage reports per tagged batch how many
events it emitted and how many it dropped, so the summary is exact.

What dedup does to a replay: within the dedup window an id already emitted is dropped, so a replay
emits only what did not make it the first time (events that were dead-lettered and now pass after an
adapter fix, or ids older than the window). `reemit=True` deliberately emits every replayed event again
(once per replay), e.g. after a downstream consumer lost data; it refreshes the ids' first-seen time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click
import orjson
from aiokafka import AIOKafkaProducer

from adapters import ADAPTERS
from pipeline.adapting import AdapterModule
from pipeline.config import Settings
from pipeline.errors import HeadwaterError
from pipeline.kafka.clients import broker_errors, ensure_topics, make_producer, require_partition_counts
from pipeline.kafka.reading import TopicReader, end_offsets
from pipeline.ops.times import parse_time
from pipeline.records import KafkaHeaders, RawHeaders, ReplayTag
from pipeline.sources import SOURCES
from pipeline.stream.normalize_batch import NormalizeTargets, Send, normalize_batch


@dataclass
class ReplaySummary:
    replay_id: str
    read: int = 0
    skipped_other_tenants: int = 0
    dead_lettered: int = 0
    keyed_batches: int = 0
    canonical: int = 0
    duplicates: int = 0
    reported_batches: int = 0
    complete: bool = False
    seconds: float = 0.0
    per_partition: dict[int, tuple[int, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "per_partition"}


async def offset_range(
    settings: Settings,
    topic: str,
    start: datetime | None,
    end: datetime | None,
    start_offset: int | None = None,
    end_offset: int | None = None,
) -> dict[int, tuple[int, int]]:
    """partition -> [first, last) offsets covering the time (or offset) range."""
    async with TopicReader(settings) as reader:
        bounds = await reader.bounds(topic)
        if not bounds:
            raise HeadwaterError(f"topic {topic} does not exist")
        lows = await reader.offsets_at(topic, _ms(start)) if start is not None else {}
        highs = await reader.offsets_at(topic, _ms(end)) if end is not None else {}
    out = {}
    for partition, (first, last) in bounds.items():
        low = max(first, start_offset if start_offset is not None else lows.get(partition, first))
        high = min(last, end_offset if end_offset is not None else highs.get(partition, last))
        out[partition] = (low, max(low, high))
    return out


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def replay(
    settings: Settings,
    source: str,
    ranges: dict[int, tuple[int, int]],
    tenant: str | None = None,
    reemit: bool = False,
    adapter: AdapterModule | None = None,
    wait_s: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> ReplaySummary:
    """Normalize the range again and wait for the dedup stage's report on every batch sent."""
    topic = settings.topics.raw(source)
    tag = ReplayTag(replay_id=f"replay-{uuid.uuid4().hex[:12]}", reemit=reemit)
    summary = ReplaySummary(replay_id=tag.replay_id, per_partition=ranges)
    total = sum(high - low for low, high in ranges.values())
    started = time.monotonic()
    await ensure_topics(settings, [settings.topics.replay_results], partitions=1)
    # Replayed candidates are routed to keyed partitions as the worker routes them: same count or nothing.
    await require_partition_counts(settings, {settings.topics.keyed: settings.kafka.partitions})
    results_start = await end_offsets(settings, settings.topics.replay_results)
    adapter = adapter or ADAPTERS[source]
    targets = NormalizeTargets.from_settings(settings)
    producer = make_producer(settings, linger_ms=5)
    send = _sender(producer)
    try:
        # Every offset of the range is read (no idle give-up): the summary counts the whole range.
        async with (
            broker_errors(f"replaying {topic}", access=settings.kafka),
            TopicReader(settings) as reader,
        ):
            await producer.start()
            chunks = reader.chunks(topic, ranges, max_records=settings.worker.batch_max, idle_fetches=None)
            async for records in chunks:
                summary.read += len(records)
                if tenant is not None:
                    kept = [r for r in records if _tenant_of(r.headers) == tenant]
                    summary.skipped_other_tenants += len(records) - len(kept)
                    records = kept
                if records:
                    keyed, letters = await normalize_batch(records, adapter, send, targets, replay=tag)
                    summary.keyed_batches += keyed
                    summary.dead_lettered += letters
                if progress:
                    progress(summary.read, total)
        await _collect_reports(settings, summary, results_start, wait_s)
    finally:
        await producer.stop()
    summary.seconds = time.monotonic() - started
    return summary


def _sender(producer: AIOKafkaProducer) -> Send:
    async def send(
        topic: str, key: bytes | None, value: bytes, partition: int | None, headers: KafkaHeaders | None
    ) -> Awaitable[Any]:
        ack: Awaitable[Any] = await producer.send(
            topic, value, key=key, partition=partition, headers=list(headers) if headers else None
        )
        return ack

    return send


def _tenant_of(headers: Any) -> str | None:
    try:
        return RawHeaders.from_kafka(headers).tenant
    except Exception:  # noqa: BLE001 - a record without our headers belongs to no tenant
        return None


async def _collect_reports(
    settings: Settings, summary: ReplaySummary, start: dict[int, int], wait_s: float
) -> None:
    """Sum the dedup stage's reports for this replay until every keyed batch is accounted for."""
    if summary.keyed_batches == 0:
        summary.complete = True
        return
    topic = settings.topics.replay_results
    deadline = time.monotonic() + wait_s
    async with TopicReader(settings) as reader, contextlib.aclosing(reader.follow(topic, start)) as fetches:
        async for records in fetches:
            for record in records:
                report = orjson.loads(record.value)
                if report.get("replay_id") == summary.replay_id:
                    summary.reported_batches += int(report["batches"])
                    summary.canonical += int(report["canonical"])
                    summary.duplicates += int(report["duplicates"])
            if summary.reported_batches >= summary.keyed_batches or time.monotonic() >= deadline:
                break
    summary.complete = summary.reported_batches >= summary.keyed_batches


@click.command("replay")
@click.option("--source", required=True, type=click.Choice(SOURCES), help="Which raw.<source> topic.")
@click.option("--tenant", help="Only this tenant's records.")
@click.option("--from", "start", help="Start time: ISO-8601 or a duration ago ('2h', '7d').")
@click.option("--to", "end", help="End time (exclusive), same forms; default now.")
@click.option("--from-offset", type=int, help="Start offset in every partition (instead of --from).")
@click.option("--to-offset", type=int, help="End offset (exclusive) in every partition.")
@click.option("--reemit", is_flag=True, help="Emit replayed events even if their ids were already emitted.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the workers' dedup reports.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_obj
def replay_command(
    ctx: Any,
    source: str,
    tenant: str | None,
    start: str | None,
    end: str | None,
    from_offset: int | None,
    to_offset: int | None,
    reemit: bool,
    wait_s: float,
    as_json: bool,
) -> None:
    """Feed a range of raw.<source> through the pipeline again (needs running workers for dedup)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if start is None and from_offset is None:
        raise click.UsageError("give --from TIME or --from-offset N")
    settings = ctx.settings()
    console = Console(stderr=True)

    async def run() -> ReplaySummary:
        ranges = await offset_range(
            settings,
            settings.topics.raw(source),
            parse_time(start) if start else None,
            parse_time(end) if end else None,
            from_offset,
            to_offset,
        )
        total = sum(h - lo for lo, h in ranges.values())
        with Progress(
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.0f} rec/s"),
            TimeRemainingColumn(),
            console=console,
            disable=as_json,
        ) as bar:
            task = bar.add_task("replay", total=total, rate=0.0)
            began = time.monotonic()

            def progress(done: int, _total: int) -> None:
                bar.update(task, completed=done, rate=done / max(1e-6, time.monotonic() - began))

            return await replay(settings, source, ranges, tenant, reemit, wait_s=wait_s, progress=progress)

    summary = asyncio.run(run())
    if as_json:
        click.echo(orjson.dumps(summary.as_dict()).decode())
    else:
        click.echo(
            f"read {summary.read} records ({summary.skipped_other_tenants} of other tenants skipped) "
            f"in {summary.seconds:.1f}s: {summary.canonical} canonical, {summary.duplicates} duplicates "
            f"dropped, {summary.dead_lettered} dead-lettered"
        )
    if not summary.complete:
        click.secho(
            f"warning: the workers reported on {summary.reported_batches} of {summary.keyed_batches} "
            f"batches within {wait_s:.0f}s; are `headwater worker` processes running?",
            fg="yellow",
            err=True,
        )
        raise SystemExit(1)

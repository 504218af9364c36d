"""Dead letters as the worker builds them, written to the DLQ topic as the worker writes them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.reasons import lookup
from pipeline.records import DeadLetter, Origin, RawHeaders, RawRecord, utc_now
from pipeline.stream.record_outcomes import dead_letter
from rigs.kafka import toml_text

RECEIVED = utc_now()  # one receive time, so letters of one raw record share their headers


def config_file(settings: Settings, tmp_path: Path) -> Path:
    path = tmp_path / f"dlq-{time.monotonic_ns()}.toml"
    path.write_text(toml_text(settings))
    return path


def letter(
    settings: Settings,
    source: str = "segment",
    tenant: str = "acme",
    reason: str = "missing_event_name",
    stage: Any = "normalize",
    offset: int = 0,
    index: int | None = 0,
    body: bytes = b'[{"type":"track"}]',
    failed_at: datetime | None = None,
    redrive_count: int = 0,
) -> DeadLetter:
    """A dead letter as the worker builds it, for a raw record at `offset` of raw.<source>."""
    headers = RawHeaders(
        tenant=tenant,
        source=source,
        received_at=RECEIVED,
        request_id=f"req_{offset}",
        content_type="application/json",
        redrive_count=redrive_count,
    )
    raw = RawRecord(
        body=body,
        headers=headers,
        origin=Origin(topic=settings.topics.raw(source), partition=0, offset=offset),
    )
    entry = dataclasses.replace(lookup(reason), code=reason)  # keeps a parametrized code such as wrong_type:x
    made = dead_letter(raw, stage, entry, f"{reason} at item {index}", index=index, element={"i": index})
    return made.model_copy(update={"failed_at": failed_at}) if failed_at else made


def put(settings: Settings, letters: list[DeadLetter]) -> None:
    """Write dead letters to the DLQ topic exactly as the worker does (key = id, value = JSON)."""

    async def run() -> None:
        await ensure_topics(settings, [settings.topics.dlq])
        producer = make_producer(settings)
        await producer.start()
        try:
            acks = [await producer.send(settings.topics.dlq, d.to_json(), key=d.id.encode()) for d in letters]
            await asyncio.gather(*acks)
        finally:
            await producer.stop()

    asyncio.run(run())

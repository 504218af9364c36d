"""The DLQ page over a large DLQ: bounded reads, off the worker's consumer path.

100,000 dead letters on events.dlq, a real `headwater worker` serving the page, raw events flowing
through it meanwhile: every list answers in under a second and both stages keep committing.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable

import aiohttp
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from rigs.dlq import letter
from rigs.kafka import WorkerProcess, produce_raw, wait_for

from pipeline.config import Settings
from pipeline.kafka.clients import ensure_topics, make_producer
from pipeline.kafka.local import free_port

pytestmark = pytest.mark.slow

LETTERS = 100_000


def fill_dlq(settings: Settings, count: int) -> None:
    """`count` dead letters on the DLQ topic, as the worker writes them (key = id), each with its own id."""
    template = letter(settings, "segment", "acme", "missing_user_identity", offset=1, index=2).to_json()
    first_id = orjson.loads(template)["id"].encode()

    async def run() -> None:
        await ensure_topics(settings, [settings.topics.dlq])
        producer = make_producer(settings, linger_ms=20, max_batch_size=1024 * 1024)
        await producer.start()
        try:
            pending = []
            for i in range(count):
                letter_id = f"dl_{i:024x}".encode()
                pending.append(
                    await producer.send(
                        settings.topics.dlq, template.replace(first_id, letter_id), key=letter_id
                    )
                )
                if len(pending) == 5_000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    asyncio.run(run())


def committed(settings: Settings, group: str) -> int:
    """The sum of a consumer group's committed offsets (0 before its first commit)."""

    async def run() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
        await admin.start()
        try:
            offsets: dict[TopicPartition, object] = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        return sum(max(0, meta.offset) for meta in offsets.values())  # type: ignore[attr-defined]

    return asyncio.run(run())


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, int, str]:
    started = time.perf_counter()
    async with session.get(url) as response:
        text = await response.text()
    return time.perf_counter() - started, response.status, text


def test_with_100k_dead_letters_the_list_answers_within_a_second_while_the_stages_keep_committing(
    make_settings: Callable[..., Settings], start_worker: Callable[..., WorkerProcess]
) -> None:
    """100,000 letters on the DLQ: the list (default window and limit) and a detail link each answer in
    under 1 s, ten times in a row, while raw events stream through the worker and both its stages commit."""
    port = free_port()
    settings = make_settings(worker={"web_port": port})
    fill_dlq(settings, LETTERS)
    start_worker(settings)
    base = f"http://127.0.0.1:{port}"
    event = (
        b'{"event_id": "e_%d", "event_name": "paid", "user_id": "u1", "timestamp": "2024-03-01T12:00:00Z"}'
    )
    produce_raw(settings, "customerglu", [event % 0])
    wait_for(lambda: committed(settings, f"{settings.worker.app_id}-dedup") > 0, timeout=120)
    stop = threading.Event()

    def stream_events() -> None:
        n = 1
        while not stop.is_set():
            produce_raw(settings, "customerglu", [event % i for i in range(n, n + 200)])
            n += 200

    before = {
        stage: committed(settings, f"{settings.worker.app_id}-{stage}") for stage in ("normalize", "dedup")
    }
    producer = threading.Thread(target=stream_events, daemon=True)
    producer.start()

    async def browse() -> list[tuple[float, int, str]]:
        answers = []
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                listed = await timed_get(session, base + "/")
                link = re.findall(r'href="(/letters/[^"]+)"', listed[2])[0].replace("&amp;", "&")
                answers += [listed, await timed_get(session, base + link)]
        return answers

    def both_stages_moved_on() -> dict[str, int] | None:
        after = {stage: committed(settings, f"{settings.worker.app_id}-{stage}") for stage in before}
        return after if all(after[stage] > before[stage] for stage in before) else None

    try:
        answers = asyncio.run(browse())
        # browsing can take less time than a commit interval: the stages must commit while events stream
        after = wait_for(both_stages_moved_on, timeout=60)
    finally:
        stop.set()
        producer.join(30)
    assert all(status == 200 for _, status, _ in answers)
    assert max(seconds for seconds, _, _ in answers) < 1.0, [round(s, 3) for s, _, _ in answers]
    assert answers[0][2].count('<tr class="letter">') == 100
    assert all(after[stage] > before[stage] for stage in before), (before, after)
